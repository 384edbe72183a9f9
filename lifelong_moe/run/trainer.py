"""The Lightning edge of the loop: one fresh ``Trainer`` per experience, set up the same way,
and ``fit``, which wires it to the step checkpoints and the stop decision for one experience.

The process layout a launcher started (run/distributed.py), a
progress bar that does not redraw at every step, Lightning's external-callback discovery
done once per process, and the learning rates the optimizer actually stepped with.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig
from torch.utils.data import Dataset

from lifelong_moe import compat, names
from lifelong_moe.config.groups import CheckpointPolicy
from lifelong_moe.measure.throughput import tokens_per_sample
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.run import distributed, expert_parallel, signals
from lifelong_moe.run.budget import Budget, budget_for
from lifelong_moe.run.checkpoints import StepCheckpoint, checkpoint_writer, make_loader
from lifelong_moe.run.stop_sync import StopSync
from lifelong_moe.stream import Experience

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


compat.replace_external_callback_discovery(_external_callbacks)


def make_trainer(
    cfg: DictConfig,
    callbacks: list[L.Callback] | None = None,
    checkpoint_io: CheckpointIO | None = None,
    budget: Budget | None = None,
) -> L.Trainer:
    """A fresh Trainer for one experience, trained for ``budget`` (run/budget.py; by default
    ``trainer.max_epochs``).

    Several processes are started by a launcher (torchrun, srun) and every one runs the whole
    loop with plain ``ddp`` (run/distributed.py); only global rank 0 writes to MLflow (see
    ``tracker_for_rank``). Each process's loader takes its own shard of every batch
    (``make_loader``), so Lightning's distributed sampler stays off.
    """
    t = cfg.trainer
    plugins: list[Any] = [checkpoint_io] if checkpoint_io is not None else []
    layout = distributed.trainer_layout(cfg)
    # The bar redraws at every step by default: a tenth of a small CPU step (results/loop_cpu.md).
    bar = [TQDMProgressBar(refresh_rate=PROGRESS_REFRESH_STEPS)] if t.progress_bar else []
    budget = budget or Budget(max_epochs=t.max_epochs)
    return L.Trainer(
        plugins=plugins or None,
        callbacks=[*bar, *(callbacks or []), LRTrace()],  # LRTrace last: see its on_fit_end
        max_epochs=budget.max_epochs,
        max_steps=budget.max_steps,
        accumulate_grad_batches=t.get("accumulate_grad_batches", 1),
        accelerator=t.accelerator,
        **layout,
        use_distributed_sampler=False,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        enable_progress_bar=t.progress_bar,
        logger=False,
        enable_checkpointing=False,  # ours: checkpointing.StepCheckpoint
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def fit(
    cfg: DictConfig,
    method: ContinualMethod,
    experience: Experience,
    data: Dataset,
    folder: Path,
    ckpt: Path | None,
    curve: L.Callback | None = None,
) -> L.Trainer:
    """Train on one experience with a fresh Trainer for its budget (run/budget.py), writing step
    checkpoints as it goes, and stopping at a step boundary on a signal (every DDP rank at the
    same: stop_sync.py). ``curve`` (run/curves.py) comes before the checkpoint callback, so that
    a step's curve point is in the checkpoint that step writes."""
    i = experience.index
    loader = make_loader(
        data,
        cfg.trainer.batch_size,
        cfg.trainer.num_workers,
        seed=cfg.seed * 1_000 + i,
        shard=(distributed.global_rank(), distributed.world_size()),
    )
    policy = CheckpointPolicy(**cfg.get("checkpoint", {}))
    writer = checkpoint_writer(
        keep=policy.keep, background=policy.background, accelerator=cfg.trainer.accelerator
    )
    saver = StepCheckpoint(
        folder,
        i,
        every_n_steps=policy.every_n_steps,
        writer=writer,
        sampler=loader.sampler,
    )
    limits = budget_for(cfg.trainer, len(data), tokens_per_sample(data), distributed.world_size())
    callbacks = [*([curve] if curve is not None else []), saver, StopSync()]
    callbacks.append(distributed.SumCounters())
    callbacks.append(expert_parallel.ExpertGrads())  # trainer.expert_parallel: expert gradients
    trainer = make_trainer(cfg, callbacks=callbacks, checkpoint_io=writer, budget=limits)
    if method.lightning_loop:
        # A signal stops at the next step boundary, every DDP rank at the same (stop_sync.py).
        with signals.training():
            method.fit_experience(experience, loader, trainer, ckpt_path=ckpt)
    else:
        method.fit_experience(experience, loader, trainer)
    saver.apply_pending_rng()
    return trainer


class LRTrace(L.Callback):
    """Mean and last learning rate of one experience's optimizer steps, read from the optimizer.

    What ``schedule.name`` did, logged beside the losses as ``train/lr_mean`` and
    ``train/lr_last`` (the schedule's formula is tested on its own; this shows a run used it).
    Logged like the losses, at each epoch end, so that the values also come back from DDP
    workers; the sums travel in training checkpoints (``state_dict``), so an experience resumed
    from one reports what an uninterrupted one would.
    """

    def __init__(self) -> None:
        self.total, self.steps, self.last = 0.0, 0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        # The rate this batch's optimizer step uses: a step scheduler moves it after the step.
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.total, self.steps, self.last = self.total + lr, self.steps + 1, lr

    def metrics(self) -> dict[str, float]:
        if not self.steps:
            return {}
        return {names.TRAIN_LR_MEAN: self.total / self.steps, names.TRAIN_LR_LAST: self.last}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for key, value in self.metrics().items():  # float64: a learning rate logged as it is
            value = torch.tensor(value, dtype=torch.float64)
            pl_module.log(key, value, batch_size=1, sync_dist=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fit resumed after its last epoch logged nothing: hand over the restored values, as
        checkpointing.StepCheckpoint does for the losses. It must run after that callback's
        ``on_fit_end``, which looks for any train/* key: make_trainer puts this one last."""
        if names.TRAIN_LR_MEAN not in trainer.callback_metrics:
            trainer.callback_metrics.update(self.metrics())

    def state_dict(self) -> dict[str, float | int]:
        return {"total": self.total, "steps": self.steps, "last": self.last}

    def load_state_dict(self, state_dict: dict[str, float | int]) -> None:
        self.total, self.steps = state_dict["total"], state_dict["steps"]
        self.last = state_dict["last"]
