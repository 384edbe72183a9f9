"""The Lightning edge of the loop: one fresh ``Trainer`` per experience, set up the same way.

Strategy choice on one machine (fork/spawn instead of re-running the command per rank), a
progress bar that does not redraw at every step, and Lightning's external-callback discovery
done once per process.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from typing import Any

import lightning as L
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.connectors import callback_connector as _callback_connector
from omegaconf import DictConfig

PROGRESS_REFRESH_STEPS = 10


@functools.cache
def _callback_factories(group: str) -> tuple:
    return tuple(entry_points(group=group))


def _external_callbacks(group: str) -> list:
    """Lightning's external-callback discovery with the entry-point scan done once per process.

    Every Trainer scans all installed distributions' entry points (~12 ms of CPU, measured in
    results/loop_cpu.md): a sixth of a 3-epoch experience of split digits. Factories are still
    called per Trainer, so no callback instance is shared between experiences.
    """
    callbacks: list = []
    for factory in _callback_factories(group):
        made = factory.load()()
        callbacks.extend(made if isinstance(made, list) else [made])
    return callbacks


if hasattr(_callback_connector, "_load_external_callbacks"):
    _callback_connector._load_external_callbacks = _external_callbacks


def make_trainer(
    cfg: DictConfig,
    callbacks: list[L.Callback] | None = None,
    checkpoint_io: CheckpointIO | None = None,
) -> L.Trainer:
    """A fresh Trainer for one experience.

    On one machine ``ddp`` becomes ``ddp_fork`` (CPU) or ``ddp_spawn`` (GPU, where CUDA forbids
    fork): plain ``ddp`` re-runs the whole command for every rank at each ``fit``, which cannot
    follow a loop that builds a Trainer per experience. Both train in worker processes and hand
    rank 0's weights back to this process, which alone evaluates and logs. On several nodes every
    process is started by the cluster (SLURM, torchrun), runs the whole loop with plain ``ddp``,
    and only global rank 0 writes to MLflow (see ``tracker_for_rank``).
    """
    t = cfg.trainer
    strategy = t.strategy
    plugins: list[Any] = [checkpoint_io] if checkpoint_io is not None else []
    several = t.devices == "auto" or t.devices != 1
    if t.num_nodes == 1 and (strategy == "ddp" or (strategy == "auto" and several)):
        strategy = "ddp_fork" if t.accelerator == "cpu" else "ddp_spawn"
        # Inside a SLURM allocation Lightning would expect SLURM to have started the ranks.
        plugins.append(LightningEnvironment())
    # The bar redraws at every step by default: a tenth of a small CPU step (results/loop_cpu.md).
    bar = [TQDMProgressBar(refresh_rate=PROGRESS_REFRESH_STEPS)] if t.progress_bar else []
    return L.Trainer(
        plugins=plugins or None,
        callbacks=[*bar, *(callbacks or [])],
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        enable_progress_bar=t.progress_bar,
        logger=False,
        enable_checkpointing=False,  # ours: checkpointing.StepCheckpoint
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
