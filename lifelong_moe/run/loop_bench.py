"""``lifelong-moe-bench loop``: the training loop's own cost, against a bare PyTorch loop.

Both sides run in one process on the same config: the same model class and initial weights
(``runner.build`` with the same seed), the same experiences, DataLoader (batch size, shuffle
seed), epochs, AdamW and loss (cross-entropy plus the method's ``extra_loss``). The runner side
times exactly what ``time/train_s`` times: ``make_trainer`` + ``method.fit_experience``. The bare
side is ``for x, y in loader: loss.backward(); opt.step()``. Repeats alternate which side goes
first, and the report gives the median of each side and the ratio of the medians, in wall time
(what ``time/train_s`` reports) and in this process's CPU time (steadier on a shared machine).
Evaluation is not timed on either side (it is not part of ``time/train_s``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from lifelong_moe.config.aliases import modernize_overrides
from lifelong_moe.config.files import CONF_DIR
from lifelong_moe.run.loop import build
from lifelong_moe.run.trainer import make_trainer


def compose(overrides: list[str]) -> DictConfig:
    """The run config of ``lifelong-moe <overrides>``, without starting Hydra's app (old keys
    read as today's, as the command line does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=modernize_overrides(overrides))


def _loader(cfg: DictConfig, data: Any, index: int) -> DataLoader:
    """The runner's DataLoader for experience ``index`` (same batch size and shuffle seed)."""
    return DataLoader(
        data,
        batch_size=cfg.trainer.batch_size,
        shuffle=True,
        num_workers=cfg.trainer.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed * 1_000 + index),
    )


class Clock:
    """Wall and process-CPU seconds accumulated over the timed sections."""

    def __init__(self, model: nn.Module) -> None:
        self.wall = self.cpu = 0.0
        self.model = model  # the trained model, for checking that both sides did the same work

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def runner_side(cfg: DictConfig) -> Clock:
    """Seconds of the runner's training over the stream: sum of ``time/train_s``."""
    exp = build(cfg)
    clock = Clock(exp.model)
    for i, experience in enumerate(exp.stream.experiences):
        exp.method.before_experience(experience)
        data = exp.method.train_dataset(experience)
        loader = _loader(cfg, data, i)
        with clock:
            trainer = make_trainer(cfg)
            exp.method.fit_experience(experience, loader, trainer)
        exp.method.after_experience(experience)
    return clock


def bare_side(cfg: DictConfig) -> Clock:
    """Seconds of a plain PyTorch loop doing the same training over the stream."""
    exp = build(cfg)
    method, model = exp.method, exp.model
    torch.use_deterministic_algorithms(bool(cfg.trainer.deterministic))
    clip = cfg.trainer.gradient_clip_val
    clock = Clock(model)
    for i, experience in enumerate(exp.stream.experiences):
        method.before_experience(experience)
        data = method.train_dataset(experience)
        loader = _loader(cfg, data, i)
        clock.__enter__()
        mask = method.expert_mask(experience)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=method.lr, weight_decay=method.weight_decay)
        model.train()
        for _ in range(cfg.trainer.max_epochs):
            for batch in loader:
                x, y = batch[0], batch[1]
                logits, aux = model(x) if mask is None else model(x, expert_mask=mask)
                loss = nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten())
                loss = loss + sum(method.extra_loss(x, y, logits, aux).values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    nn.utils.clip_grad_norm_(params, clip)
                opt.step()
        clock.__exit__()
        method.after_experience(experience)
    return clock


def measure(
    overrides: list[str], repeats: int, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Interleaved repeats of both sides; medians, ratios of medians and every raw time."""
    cfg = compose(overrides)
    sides = {"runner": runner_side, "bare": bare_side}
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            clock = sides[name](cfg)
            wall[name].append(clock.wall)
            cpu[name].append(clock.cpu)
        log(
            f"repeat {r + 1}/{repeats}: runner {wall['runner'][-1]:.2f}s "
            f"(cpu {cpu['runner'][-1]:.2f}s)  bare {wall['bare'][-1]:.2f}s "
            f"(cpu {cpu['bare'][-1]:.2f}s)"
        )
    med = statistics.median
    return {
        "overrides": overrides,
        "repeats": repeats,
        "runner_s": wall["runner"],
        "bare_s": wall["bare"],
        "runner_cpu_s": cpu["runner"],
        "bare_cpu_s": cpu["bare"],
        "runner_median_s": med(wall["runner"]),
        "bare_median_s": med(wall["bare"]),
        "ratio": med(wall["runner"]) / med(wall["bare"]),
        "ratio_cpu": med(cpu["runner"]) / med(cpu["bare"]),
        # the least disturbed repeat of each side: steadiest where other jobs share the cores
        "ratio_cpu_min": min(cpu["runner"]) / min(cpu["bare"]),
    }
