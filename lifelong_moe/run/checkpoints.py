"""Training checkpoints inside an experience, so that a kill loses minutes, not an experience.

Every ``checkpoint.every_n_steps`` optimizer steps and at the end of every epoch the
``StepCheckpoint`` callback writes a Lightning checkpoint (``Trainer.save_checkpoint``) to
``<checkpoint.dir>/<run_id>/exp<i>-step<s>.ckpt`` on local disk and keeps the newest
``checkpoint.keep``. It holds what Lightning holds (model of the grown size, optimizer,
loop progress, the data loader's position) plus the RNG states and the method's running epoch
loss sums (``StepStats``, so a resumed epoch logs the same train/* means). An epoch's checkpoint
is written in ``on_train_epoch_end``, once Lightning counts the epoch as processed, never at its
last batch (see ``StepCheckpoint.on_train_epoch_end``).

A resumed run first restores the experience-boundary state (``resume.py``), replays
``before_experience`` under the restored RNG (which rebuilds the method's state for the
experience exactly: grown experts, frozen banks, teacher, expert origins; EWC's Fisher and the
replay buffer only change after an experience), then calls ``fit(ckpt_path=...)`` with the
newest checkpoint of that experience.

Data order: ``EpochSampler`` draws each epoch's permutation from (seed, experience, epoch)
alone, and torchdata's ``StatefulDataLoader`` (which Lightning saves and restores) skips the
batches already trained on; so the resumed run sees exactly the batches the uninterrupted one
would have seen.

Writing (``RotatingCheckpointIO``): temporary file, rename, drop the oldest, so a kill while
writing leaves the previous checkpoint intact. With ``checkpoint.background`` (by default on
a GPU) Lightning's ``AsyncCheckpointIO`` does it in a background thread and training waits only
while the checkpoint is gathered and its tensors copied; Lightning waits for the last write when
``fit`` ends, also when a signal stops it. On CPU the writes stay in line: there a writer thread
competes with training for the same cores (results/checkpoint_cost.md).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lifelong_moe import checks, compat, names
from lifelong_moe.errors import ConfigError
from lifelong_moe.run import signals, stop_sync
from lifelong_moe.run.resume import capture_rng, restore_rng

NAME = re.compile(r"exp(\d+)-step(\d+)\.ckpt$")
# Training seconds of the experience before the checkpoint a resumed fit started from.
EARLIER_TRAIN_S = "checkpoint/earlier_train_s"
# torchdata calls a deprecated torch function at every loader creation: one warning per
# experience that says nothing about the run.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


class EpochSampler(Sampler[int]):
    """A shuffle whose order depends on (seed, epoch) only, never on what ran before.

    Lightning calls ``set_epoch`` at the start of every epoch; a resumed loader therefore
    rebuilds the interrupted epoch's permutation, and the later ones, exactly. Under DDP rank
    ``r`` of ``w`` takes every w-th index from position r (the permutation padded with its
    first indices to a multiple of w, as ``DistributedSampler`` pads), so the ranks' first
    batches of size b together are the first w * b indices: one process's batch of w * b.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, replicas: int = 1) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.rank, self.replicas = rank, replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.replicas)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator)
        padded = torch.cat([order, order[: len(self) * self.replicas - self.n]])
        return iter(padded[self.rank :: self.replicas].tolist())


def make_loader(
    data: Dataset, batch_size: int, num_workers: int, seed: int, shard: tuple[int, int] = (0, 1)
) -> StatefulDataLoader:
    """The training loader of one experience: shuffled by ``EpochSampler``, resumable mid-epoch;
    ``shard`` = (rank, world size) under DDP."""
    rank, replicas = shard
    return StatefulDataLoader(
        data,
        batch_size=batch_size,
        sampler=EpochSampler(len(data), seed, rank, replicas),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # Each new epoch's iterator draws its workers' base seed from this generator; without
        # it the draw comes from torch's global RNG, which a run resumed from an epoch-end
        # checkpoint would then see one draw short (router noise and dropout would differ).
        generator=torch.Generator().manual_seed(seed),
    )


def run_dir(root: str, run_id: str) -> Path:
    """Where one run keeps its checkpoints (absolute, so a resume from elsewhere finds them)."""
    return (Path(root) / run_id).resolve()


def checkpoints(folder: Path, experience: int | None = None) -> list[Path]:
    """The run's checkpoints, oldest first; only those of ``experience`` when given."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = NAME.match(path.name)
        if match and (experience is None or int(match.group(1)) == experience):
            found.append(((int(match.group(1)), int(match.group(2))), path))
    return [path for _, path in sorted(found)]


def describe(path: Path) -> dict[str, int]:
    """Experience, epoch and step of a checkpoint, read back safely (``weights_only``)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        meta = saved["lifelong_moe"]
        return {"experience": meta["experience"], "epoch": meta["epoch"], "step": meta["step"]}
    except Exception as error:
        first = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise ConfigError(
            f"resume: checkpoint {path} cannot be read ({first}); move it away to resume from "
            "the experience boundary instead"
        ) from None


def remove(folder: Path) -> None:
    """A finished run needs no training checkpoints."""
    shutil.rmtree(folder, ignore_errors=True)


class RotatingCheckpointIO(TorchCheckpointIO):
    """Writes ``exp<i>-step<s>.ckpt`` atomically on local disk and keeps the newest ``keep``.

    In line, or inside ``AsyncCheckpointIO``'s thread; it counts what the writes cost either way.
    """

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep
        self.bytes = 0  # size of the newest checkpoint written
        self.write_seconds = 0.0  # serialising and writing (a resume restores the earlier sum)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        start = time.perf_counter()
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Straight to the local file: Lightning's own write (in memory, then an fsspec
        # transaction) would make the temporary file atomic a second time, at ~2 ms a checkpoint.
        torch.save(checkpoint, tmp)
        match = NAME.match(path.name)
        if match:  # test hook: a kill now finds the previous checkpoint, not this one
            signals.point("checkpoint_write", int(match.group(1)), int(match.group(2)))
        os.replace(tmp, path)
        for old in checkpoints(path.parent)[: -self.keep]:
            old.unlink(missing_ok=True)
        self.bytes = path.stat().st_size
        self.write_seconds += time.perf_counter() - start


def checkpoint_writer(
    keep: int, background: bool | str = "auto", accelerator: str = "cpu"
) -> RotatingCheckpointIO | AsyncCheckpointIO:
    """The Trainer plugin that writes training checkpoints: in a background thread when
    ``background`` (``auto``: when training on a GPU), else in line."""
    checks.positive_int("checkpoint.keep", keep)
    checks.choice("checkpoint.background", background, ("auto", True, False))
    if background == "auto":
        background = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    files = RotatingCheckpointIO(keep)
    return AsyncCheckpointIO(files) if background else files


class StepCheckpoint(L.Callback):
    """Writes checkpoints at step boundaries, stops there on a signal, and restores RNG states."""

    def __init__(
        self,
        folder: Path,
        experience: int,
        every_n_steps: int,
        writer: RotatingCheckpointIO | AsyncCheckpointIO,
        sampler: Any,
    ) -> None:
        checks.non_negative_int("checkpoint.every_n_steps", every_n_steps)
        self.folder = folder
        self.experience = experience
        self.every_n_steps = every_n_steps
        self.writer = writer  # the Trainer's checkpoint plugin (``checkpoint_writer``)
        self.files = writer.checkpoint_io if isinstance(writer, AsyncCheckpointIO) else writer
        self.sampler = sampler
        self.saved_step: int | None = None
        self.seconds = 0.0  # training waited for checkpoints (the cost/checkpoint_s metric)
        # Training time of this experience before the checkpoint a resumed fit starts from, so
        # that cost/train_s counts the whole experience, not only the resumed part.
        self.earlier_train_s = 0.0
        self._start = time.perf_counter()
        self._pending_rng: dict[str, Any] | None = None
        self._at_epoch_end = False  # set while on_train_epoch_end writes
        self._resumed_stats = False  # the method's epoch sums came from a checkpoint

    # -- what Lightning stores of this callback ------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict["rng"]

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["lifelong_moe"] = {
            "experience": self.experience,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "epoch_end": self._at_epoch_end,
            "train_s": self.earlier_train_s + time.perf_counter() - self._start,
            "checkpoint_s": self.seconds,
            "checkpoint_write_s": self.files.write_seconds,
        }
        stats = getattr(pl_module, "step_stats", None)
        if stats is not None:
            checkpoint["lifelong_moe"]["step_stats"] = stats.state_dict()
        if self._at_epoch_end:
            # The loader's position at an epoch's end is an exhausted iterator: the next epoch
            # starts a fresh one (Lightning does not restore loader state for a finished epoch).
            fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
            fit_state.pop("combined_loader", None)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        meta = checkpoint.get("lifelong_moe", {})
        # The loader restores its position on the sampler's current epoch: set it first (after
        # an epoch-end checkpoint the next epoch's; Lightning sets it again before iterating).
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(checkpoint["epoch"] + int(bool(meta.get("epoch_end"))))
        self.earlier_train_s = meta.get("train_s", 0.0)
        self.seconds = meta.get("checkpoint_s", 0.0)
        self.files.write_seconds = meta.get("checkpoint_write_s", 0.0)  # nothing written yet
        stats = getattr(pl_module, "step_stats", None)
        if stats is not None and "step_stats" in meta:
            stats.load_state_dict(meta["step_stats"])
            self._resumed_stats = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        compat.restore_loader_position(trainer)  # Lightning #20550
        self.apply_pending_rng()

    def apply_pending_rng(self) -> None:
        """Bring the RNGs to where the checkpoint was written (also when fit had nothing left)."""
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None

    # -- writing -------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = trainer.global_step
        signals.STATE.step = step
        signals.point("train_step", self.experience, step, settle=self.writer.teardown)
        if idx + 1 >= trainer.num_training_batches:
            return  # the epoch's last batch: on_train_epoch_end writes the checkpoint
        if (idx + 1) % trainer.accumulate_grad_batches:
            return  # inside a gradient accumulation: a checkpoint here would lose the gradients
        stop = stop_sync.decide(trainer)  # under DDP every rank gets the same answer
        if stop or (self.every_n_steps and step % self.every_n_steps == 0):
            self.save(trainer)
        if stop:
            stop_sync.stop(trainer, stop)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the epoch's checkpoint once the epoch is over in Lightning's progress.

        Written at the last batch instead (``on_train_batch_end``), it resumes through
        Lightning's "restarted on the last batch" path, which skips ``on_train_epoch_end`` (the
        method's epoch means, train/*) and restarts the next epoch half-way through its hooks.
        Here the epoch counts as processed, and a resume starts the next epoch as a fresh run
        would (or, after the last epoch, has nothing left to train). Lightning calls this hook
        before the method's own ``on_train_epoch_end``, which logs train/* from the StepStats
        sums that this checkpoint holds.
        """
        self._at_epoch_end = True
        try:
            self.save(trainer)
        finally:
            self._at_epoch_end = False
        stop = stop_sync.decide(trainer)
        if stop:
            stop_sync.stop(trainer, stop)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a resume that had no epoch left to train, report the finished epoch's means.

        The method logs train/* in its ``on_train_epoch_end``, which ran before the kill; the
        checkpoint brought back its sums (StepStats), so the runner finds the same values in
        ``trainer.callback_metrics`` as after an uninterrupted fit. (``callback_metrics`` is
        public, but that updating it sticks relies on it returning the logger connector's own
        dict: checked against Lightning 2.6.6.)
        """
        metrics = trainer.callback_metrics
        if self._resumed_stats and not any(k.startswith(names.train_term("")) for k in metrics):
            metrics.update(pl_module.step_stats.epoch_metrics())
        # Lightning has waited for the last write (teardown comes before on_fit_end). The costs
        # travel in callback_metrics: from a DDP worker, that is what reaches the main process.
        costs = {
            names.COST_CHECKPOINT_S: self.seconds,
            names.COST_CHECKPOINT_WRITE_S: self.files.write_seconds,
            names.COST_CHECKPOINT_MB: self.files.bytes / 2**20,
            EARLIER_TRAIN_S: self.earlier_train_s,
        }
        metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in costs.items()})

    def save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if self.saved_step == step:
            return
        start = time.perf_counter()
        # Every rank takes part; rank 0 hands the checkpoint to the background writer.
        trainer.save_checkpoint(self.folder / f"exp{self.experience}-step{step}.ckpt")
        self.saved_step = step
        self.seconds += time.perf_counter() - start


def fit_costs(trainer: L.Trainer) -> dict[str, float]:
    """What ``StepCheckpoint`` reported of the fit that just returned (taken out of the
    Trainer's callback metrics): the ``cost/checkpoint_*`` metrics and ``EARLIER_TRAIN_S``."""
    keys = (names.COST_CHECKPOINT_S, names.COST_CHECKPOINT_WRITE_S, names.COST_CHECKPOINT_MB)
    metrics = trainer.callback_metrics
    return {k: float(metrics.pop(k, 0.0)) for k in (*keys, EARLIER_TRAIN_S)}
