"""The shared LightningModule of every continual-learning method.

The runner drives it: ``before_experience`` -> ``Trainer.fit`` on ``train_dataset(exp)`` ->
evaluation -> ``after_experience``. A method changes the data it trains on, the extra loss
terms, or the model between experiences; everything else (optimizer, logging, NaN guard) is here.

Optimizer state: Lightning builds a fresh optimizer at every ``fit``, so AdamW moments start
from zero at each experience. That is deliberate: the parameter set changes between experiences
(Lifelong-MoE adds experts, freezes others) and stale moments of another task would only bias
the first steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from lifelong_moe import checks, compat, names
from lifelong_moe.log import LOGGER
from lifelong_moe.methods.lr_schedule import LRSchedule
from lifelong_moe.methods.replay_buffer import ReplayBuffer
from lifelong_moe.methods.step_stats import StepStats
from lifelong_moe.methods.step_tokens import StepTokens
from lifelong_moe.models import moe_layers
from lifelong_moe.models.checkpoint import (
    drop_expert_moments,
    gathered_state_dict,
    sharded_layers,
    sharded_state_dict,
)
from lifelong_moe.stream import Experience, Stream

__all__ = ["ContinualMethod", "make_replay"]


class ContinualMethod(L.LightningModule):
    """Cross-entropy training of ``model`` (which returns ``(logits, aux)``) on one experience at a time."""

    # Trains with Lightning's loop: checkpoints and signal stops at step boundaries apply.
    lightning_loop = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        replay_buffer_size: int = 0,
        replay_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        checks.positive("method.lr", lr)
        checks.non_negative("method.weight_decay", weight_decay)
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.stream: Stream | None = None
        self.experience: Experience | None = None
        self.seen: list[Experience] = []
        self.replay = make_replay(replay_buffer_size)
        self.step_stats = StepStats()
        self.step_tokens = StepTokens()
        self.replay_fraction = check_replay_fraction(replay_fraction)
        self.replay_seed = torch.initial_seed()  # the runner has just seeded torch with ``seed``
        self.lr_schedule = LRSchedule()

    @staticmethod
    def after_fit(trainer: L.Trainer) -> None:
        """Called right after ``trainer.fit``; the run sets it to its stop decision
        (``run.stop_sync.after_fit``: DDP workers stopped on a signal raise ``Interrupted`` here)."""

    def __setattr__(self, name: str, value: Any) -> None:
        """Two names bypass nn.Module's registration checks.

        Lightning sets ``_current_fx_name`` around every hook (~45 times a step); skip
        nn.Module's Parameter/Module/Tensor checks for that plain string (results/loop_cpu.md).
        A method's ``teacher`` (a frozen snapshot of the past: LwF, Lifelong-MoE, SEED) is held
        outside the module tree: as a submodule it would be saved in the LightningModule's state
        and reported by Lightning at every fit as modules "in eval mode at the start of training".
        Methods move it to the batch's device themselves.
        """
        if name == compat.CURRENT_FX_NAME or name == "teacher":
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def set_lr_schedule(self, schedule: LRSchedule) -> None:
        """The runner hands over the trainer-level schedule once, before the first experience."""
        self.lr_schedule = schedule

    def __getstate__(self) -> dict:
        """What a pickle of the method holds: training needs neither the stream (its Avalanche
        benchmark holds lambdas) nor the experiences already seen."""
        state = self.__dict__.copy()
        state["stream"], state["seen"] = None, []
        return state

    # -- the runner's hooks -------------------------------------------------------------------
    def setup_stream(self, stream: Stream) -> None:
        """Called once before the first experience; methods check here that they fit the stream."""
        self.stream = stream

    def before_experience(self, exp: Experience) -> None:
        if not self.seen and not self.keeps_frozen_experts():
            thaw_restored_experts(self.model, type(self).__name__)
        self.experience = exp
        self.seen.append(exp)

    def keeps_frozen_experts(self) -> bool:
        """Whether experts a model arrives with frozen (restored from an export's
        lifelong_moe_experts.json) stay frozen. Only a method that freezes experts itself keeps
        them (Lifelong-MoE with ``freeze_old``); every other method trains all the experts it
        is given, so they are moved back to the trainable banks before its first experience."""
        return False

    def train_dataset(self, exp: Experience) -> Dataset:
        parts = [exp.train]
        if self.replay_fraction > 0:
            earlier = [e.train for e in self.seen if e.index < exp.index]
            if earlier:
                parts.append(replay_windows(exp, earlier, self.replay_fraction, self.replay_seed))
        if self.replay is not None and len(self.replay):
            parts.append(self.replay.dataset())
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def expert_mask(self, exp: Experience) -> torch.Tensor | None:
        """Expert mask for training and evaluating on ``exp``; None: route over every expert."""
        return None

    def expert_origins(self) -> list[int]:
        """The experience that created each expert of the MoE layers (routing metrics, plot).

        A method that does not grow the model has all its experts from the start (experience 0);
        a model without MoE layers has none. Growing methods override it.
        """
        layers = list(moe_layers(self.model).values())
        return [0] * layers[0].n_experts if layers else []

    def evaluation_metrics(self, t: int) -> dict[str, float]:
        """Metrics of the method itself after experience ``t``, logged beside the quality row
        (e.g. inferred routing's task-inference accuracy); none by default."""
        return {}

    def fit_experience(
        self,
        exp: Experience,
        loader: DataLoader,
        trainer: L.Trainer,
        ckpt_path: str | Path | None = None,
    ) -> None:
        """Train on one experience; Lightning's loop unless a method brings its own (peers).

        ``ckpt_path`` continues the experience from a training checkpoint (checkpointing.py),
        read with ``weights_only=True``.
        """
        trainer.fit(self, loader, ckpt_path=ckpt_path, weights_only=True)
        self.after_fit(trainer)  # the run's stop decision, before any post-fit work
        self.fitted(exp)

    def fitted(self, exp: Experience) -> None:
        """Called once ``exp`` is trained, before the run evaluates it; nothing by default.

        Runs in the process that called fit, with the whole experience at hand (DDP workers
        each train on a shard only): methods that recognise experiences at test time learn
        this one here.
        """

    def after_experience(self, exp: Experience) -> None:
        """Called after evaluation of experience ``exp``; e.g. EWC's Fisher, replay buffer updates.

        Subclasses that override it call ``super()`` so that replay keeps working.
        """
        if self.replay is not None:
            self.replay.add(exp.train)  # the experience's own data, not the replayed samples

    # -- Lightning ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]

    def extra_loss(
        self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, aux: list
    ) -> dict[str, torch.Tensor]:
        """Named loss terms added to cross-entropy (already weighted)."""
        return {}

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        mask = self.expert_mask(self.experience) if self.experience is not None else None
        logits, aux = self.model(x) if mask is None else self.model(x, expert_mask=mask)
        # [B, C] classification or [B, L, V] language modelling: every position is one example.
        terms = {"ce": nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten())}
        terms.update(self.extra_loss(x, y, logits, aux))
        loss = sum(terms.values())
        # NaN guard and epoch loss on the device: no host sync per step (see step_stats.py).
        self.step_stats.update(loss, terms, self.global_step, len(y))
        if self.step_stats.due(batch_idx):
            self.step_stats.check(self._experience_index())
        if self._accumulated_steps() > 1:
            # The step's cross-entropy is that of one larger batch (step_tokens.py); the logged
            # terms and the other terms stay per micro-batch.
            flat = logits.flatten(0, -2)
            summed = nn.functional.cross_entropy(flat, y.flatten(), reduction="sum")
            scale = self.step_tokens.scale(self.trainer, batch_idx, flat.device)
            loss = loss - terms["ce"] + summed * scale
        return loss

    def on_train_epoch_start(self) -> None:
        self.step_stats.reset()

    def on_train_epoch_end(self) -> None:
        self.step_stats.check(self._experience_index())
        terms = self.step_stats.epoch_metrics()
        if terms:
            # The total and each of its terms (train/ce, train/kd, ...): epoch means, reduced over
            # DDP ranks here, once per epoch (sync_dist), never per step.
            self.log(names.TRAIN_LOSS, terms.pop(names.TRAIN_LOSS), prog_bar=True, sync_dist=True)
            self.log_dict(terms, sync_dist=True)

    def _accumulated_steps(self) -> int:
        """Micro-batches per optimizer step; 1 outside a Trainer (a test calling a step)."""
        try:
            return self.trainer.accumulate_grad_batches
        except RuntimeError:  # Lightning: "not attached to a `Trainer`"
            return 1

    def _experience_index(self) -> int | str:
        return self.experience.index if self.experience is not None else "?"

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        """AdamW, plus the per-step LR schedule of ``schedule.name`` unless it is constant."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule.is_constant:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)  # len(loader) * max_epochs
        index = self.experience.index if self.experience is not None else 0
        schedule = self.lr_schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: schedule.factor(step, total, index)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def experts_after(self, n_done: int, n_built: int) -> int:
        """Experts per MoE layer once ``n_done`` experiences are trained, from ``n_built`` (a
        resume checks its checkpoint against it). A method that grows overrides it."""
        return n_built

    # -- training checkpoints under expert parallelism --------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Experts sharded over ranks are gathered, so a step checkpoint (written by rank 0) is
        the one process's model; their optimizer moments stay out (one file, many shards)."""
        if sharded_layers(self):
            checkpoint["state_dict"] = gathered_state_dict(self)
            drop_expert_moments(self.model, checkpoint.get("optimizer_states", []))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A gathered checkpoint cut to this rank's shard, at this run's expert-parallel degree."""
        if sharded_layers(self):
            checkpoint["state_dict"] = sharded_state_dict(self, checkpoint["state_dict"])
            drop_expert_moments(self.model, checkpoint.get("optimizer_states", []))

    # -- state for checkpoints ----------------------------------------------------------------
    def method_state(self) -> dict:
        """What the method must carry across experiences beyond the model's weights.

        Subclasses extend ``super().method_state()`` so that the replay buffer is kept.
        """
        return {"replay": self.replay.state_dict()} if self.replay is not None else {}

    def load_method_state(self, state: dict) -> None:
        if self.replay is not None and "replay" in state:
            self.replay.load_state_dict(state["replay"])


# -- replay composition: any method replays with method.replay_buffer_size > 0 ----------------
def thaw_restored_experts(model: nn.Module, method: str) -> None:
    """Move every frozen expert and gate row of ``model``'s MoE layers back to training."""
    layers = moe_layers(model).values()
    frozen = {layer.n_frozen for layer in layers}
    if frozen and max(frozen) > 0:
        for layer in layers:
            layer.freeze_first(0)
        LOGGER.info(
            f"{method} trains every expert: {max(frozen)} experts per MoE layer that the "
            "model arrived with frozen are trainable again"
        )


def make_replay(size: int) -> ReplayBuffer | None:
    """The buffer is seeded from torch's initial seed, which the runner sets to ``seed``."""
    if checks.non_negative_int("method.replay_buffer_size", size) == 0:
        return None
    return ReplayBuffer(size, seed=torch.initial_seed())


# -- replay of a fixed fraction of earlier experiences' data (continual pre-training recipe) ---
def check_replay_fraction(fraction: float) -> float:
    return float(checks.fraction("method.replay_fraction", fraction, high_open=True))


def replay_windows(exp: Experience, earlier: list[Dataset], fraction: float, seed: int) -> Subset:
    """A seeded uniform sample of earlier experiences' training data (examples or text windows)
    sized so that it makes up ``fraction`` of the experience's training set (Ibrahim et al.
    2024 replay a fixed share of old data). Seeded by the run's seed and the experience
    index: the same run draws the same examples, also after resuming.
    """
    pool = ConcatDataset(earlier)
    n = round(fraction * len(exp.train) / (1 - fraction))
    generator = torch.Generator().manual_seed((seed * 1_000 + exp.index) % 2**63)
    if n <= len(pool):
        index = torch.randperm(len(pool), generator=generator)[:n]
    else:  # more than all earlier data: draw with replacement
        index = torch.randint(len(pool), (n,), generator=generator)
    return Subset(pool, index.tolist())
