"""Bytes a DDP rank hands to collectives, per training step (a test helper).

The collective functions of ``torch.distributed`` are wrapped while ``CommBytes`` is entered,
DDP's buffer broadcast among them (``compat.DDP_BUFFER_BROADCAST``); DDP and Lightning look
them up on the module at every call, so the wrappers see every call. Gradient buckets reach
them through DDP's default all-reduce registered as a communication hook (public
``register_comm_hook``), which sends exactly what DDP's built-in reduction sends.

Counted: the payload of the tensors handed to each call on this rank (what the collective
moves per rank, independent of its algorithm), not bytes on the wire.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from lifelong_moe import compat

WRAPPED = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
    compat.DDP_BUFFER_BROADCAST,
)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CommBytes(L.Callback):
    """Counts collective bytes; ``per_step`` holds the bytes of every training step."""

    def __init__(self) -> None:
        self.total = 0
        self.by_kind: dict[str, int] = {}
        self.per_step: list[int] = []
        self._originals: dict[str, Any] = {}
        self._at_step_start = 0

    def add(self, kind: str, n: int) -> None:
        self.total += n
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n

    def __enter__(self) -> CommBytes:
        for name in WRAPPED:
            original = getattr(dist, name)
            self._originals[name] = original

            @functools.wraps(original)
            def counted(*args: Any, _name: str = name, _original: Any = original, **kw: Any):
                self.add(_name, sum(_nbytes(a) for a in (*args, *kw.values())))
                return _original(*args, **kw)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # DDP's default all-reduce, as a Python hook: the buckets then go through the wrapped
        # dist.all_reduce (the C++ reducer otherwise calls the process group directly).
        trainer.strategy.model.register_comm_hook(None, default_hooks.allreduce_hook)

    def on_train_batch_start(self, *args: Any) -> None:
        self._at_step_start = self.total

    def on_train_batch_end(self, *args: Any) -> None:
        self.per_step.append(self.total - self._at_step_start)
