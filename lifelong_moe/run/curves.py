"""Training curves: points inside an experience, on one step axis over the whole stream.

Every ``tracking.log_every_n_steps`` optimizer steps ``TrainingCurves`` takes a point of the
loss and each of its terms (the mean over that step's micro-batches), the learning rate and the
global gradient norm (before clipping) the step used, the tokens trained on so far and the
tokens per second since the previous point; every ``trainer.val_check_interval`` steps, the
validation loss of every domain (``curve/val_loss/<domain>``, on ``evaluation.max_batches``).
The step of a point is the number of optimizer steps since the stream began: the experiences'
curves join into one (per-experience metrics keep step = experience).

The points are buffered, never written from here: under ``ddp_fork``/``ddp_spawn`` this runs in
a worker process that cannot reach the MLflow run. ``on_fit_end`` hands them to the process that
called ``fit`` through ``trainer.callback_metrics`` (what Lightning copies back from rank 0, as
``stop_sync`` and ``checkpoints.fit_costs`` do); the loop takes them with ``take_points`` and
logs them with the experience's row. The buffer travels in training checkpoints
(``state_dict``), so an experience resumed mid-way logs the same steps as one never interrupted,
each once. Between points the callback adds one integer per batch and a modulo: the values are
read from the device (one sync) only at the steps it logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from lifelong_moe import names
from lifelong_moe.evaluation.evaluate import forward
from lifelong_moe.evaluation.subset import fixed_subset
from lifelong_moe.stream import Experience

HANDOFF = "curves:"  # callback-metric prefix of the points handed back to the main process
TOTALS = "curve_totals:"  # the experience's steps and tokens, handed back the same way
Point = tuple[str, int, float]  # (metric name, global step, value)


class TrainingCurves(L.Callback):
    """Buffers curve points of one experience (see the module docstring)."""

    def __init__(
        self,
        every_n_steps: int,
        step_offset: int = 0,
        token_offset: int = 0,
        val_check_interval: int | None = None,
        validation: Sequence[tuple[str, Dataset, Experience]] = (),
        eval_batch_size: int = 256,
        expert_mask: Callable[[Experience], torch.Tensor | None] | None = None,
    ) -> None:
        self.every = every_n_steps
        self.step_offset, self.token_offset = step_offset, token_offset
        self.val_every = val_check_interval
        self.validation = list(validation)
        self.eval_batch_size = eval_batch_size
        self.expert_mask = expert_mask
        self.points: list[Point] = []
        self.tokens = 0  # target tokens of this rank's batches in this experience
        self._seen_step = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._micro = 0
        self._step_values: dict[str, torch.Tensor] = {}
        self._last_time, self._last_tokens = 0.0, 0

    # -- what training checkpoints keep --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self.points], "tokens": self.tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [(str(k), int(s), float(v)) for k, s, v in state_dict["points"]]
        self.tokens = int(state_dict["tokens"])

    # -- Lightning hooks -----------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step
        self._last_time, self._last_tokens = time.perf_counter(), self.tokens

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        self.tokens += batch[1].numel()  # metadata only: no device sync

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._due(trainer.global_step + 1):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        lr = float(optimizer.param_groups[0]["lr"])
        self._step_values = {names.CURVE_GRAD_NORM: norm, names.CURVE_LR: torch.tensor(lr)}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        stepped = trainer.global_step != self._seen_step
        step = trainer.global_step if stepped else trainer.global_step + 1
        if self._due(step):
            last = getattr(getattr(pl_module, "step_stats", None), "last", {})
            for key, value in last.items():
                self._sums[key] = self._sums[key] + value if key in self._sums else value
            self._micro += 1
        if not stepped:
            return
        self._seen_step = step
        if self._due(step):
            self._take_train_point(trainer, step)
        if self.val_every and step % self.val_every == 0 and trainer.is_global_zero:
            self._take_validation_point(pl_module, step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Hand the points and the experience's totals to the process that called ``fit``."""
        metrics = trainer.callback_metrics
        by_name: dict[str, list[list[float]]] = {}
        for name, step, value in self.points:
            by_name.setdefault(name, []).append([step, value])
        for name, rows in by_name.items():
            metrics[HANDOFF + name] = torch.tensor(rows, dtype=torch.float64)
        # Not under train/: StepCheckpoint.on_fit_end looks there for the losses of a fit.
        totals = {
            names.TRAIN_STEPS: trainer.global_step,
            names.TRAIN_TOKENS: self.tokens * trainer.world_size,
        }
        for key, value in totals.items():
            metrics[TOTALS + key] = torch.tensor(float(value), dtype=torch.float64)

    # -- points --------------------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        """Whether the experience's optimizer ``step`` is logged: every ``every`` steps of the
        stream's step axis, so points stay evenly spaced across experiences."""
        return self.every > 0 and (self.step_offset + step) % self.every == 0

    def _take_train_point(self, trainer: L.Trainer, step: int) -> None:
        at = self.step_offset + step
        for key, total in self._sums.items():
            curve = names.curve_term(key.removeprefix(names.train_term("")))
            self.points.append((curve, at, float(total) / self._micro))
        for key, value in self._step_values.items():
            self.points.append((key, at, float(value)))
        now, tokens = time.perf_counter(), self.tokens * trainer.world_size
        rate = (tokens - self._last_tokens * trainer.world_size) / max(now - self._last_time, 1e-9)
        self.points.append((names.CURVE_TOKENS, at, float(self.token_offset + tokens)))
        self.points.append((names.CURVE_TOKENS_PER_S, at, rate))
        self._last_time, self._last_tokens = now, self.tokens
        self._sums, self._micro, self._step_values = {}, 0, {}

    def _take_validation_point(self, pl_module: L.LightningModule, step: int) -> None:
        model = getattr(pl_module, "model", pl_module)
        for domain, data, experience in self.validation:
            mask = self.expert_mask(experience) if self.expert_mask is not None else None
            loss = validation_loss(model, data, self.eval_batch_size, pl_module.device, mask)
            self.points.append((names.curve_val_loss(domain), self.step_offset + step, loss))


@torch.no_grad()
def for_experience(
    cfg: Any, stream: Any, expert_mask: Callable, logged: Sequence[dict[str, float]]
) -> TrainingCurves:
    """The curves of the next experience: its steps and tokens continue where the experiences
    already logged (``logged``, their rows) left off, so the stream has one step axis."""
    evaluation = cfg.get("evaluation", {})
    return TrainingCurves(
        every_n_steps=cfg.tracking.get("log_every_n_steps", 0),
        step_offset=int(sum(r.get(names.TRAIN_STEPS, 0) for r in logged)),
        token_offset=int(sum(r.get(names.TRAIN_TOKENS, 0) for r in logged)),
        val_check_interval=cfg.trainer.get("val_check_interval"),
        validation=validation_sets(
            stream, evaluation.get("max_batches"), cfg.trainer.eval_batch_size
        ),
        eval_batch_size=cfg.trainer.eval_batch_size,
        expert_mask=expert_mask,
    )


def validation_loss(
    model: nn.Module,
    data: Dataset,
    batch_size: int,
    device: torch.device,
    mask: torch.Tensor | None = None,
) -> float:
    """Mean cross-entropy over every scored target of ``data`` (targets of -100 are not).

    Batches are sliced by index, not drawn by a DataLoader: creating a loader's iterator takes
    a number from torch's global RNG, which would change the rest of training.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for start in range(0, len(data), batch_size):
        batch = default_collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        x, y = batch[0].to(device), batch[1].to(device)
        logits = forward(model, x, mask)[0]
        flat = logits.reshape(-1, logits.shape[-1]).float()
        total += nn.functional.cross_entropy(flat, y.reshape(-1), reduction="sum")
        count += int((y != -100).sum())
    model.train(was_training)
    return total.item() / max(count, 1)


def validation_sets(stream: Any, max_batches: int | None, batch_size: int) -> list:
    """(domain name, data, experience) per experience: the stream's validation windows where it
    has them (text and token streams), else its test set; cut to ``max_batches`` like evaluation."""
    held_out = list(getattr(stream, "validation", None) or [])
    domains = list(getattr(stream, "domains", None) or [])
    out = []
    for exp in stream.experiences:
        data = held_out[exp.index] if len(held_out) > exp.index else exp.test
        if max_batches is not None:
            data = fixed_subset(data, max_batches * batch_size)
        name = domains[exp.index].name if len(domains) > exp.index else f"exp{exp.index}"
        out.append((name, data, exp))
    return out


def take_totals(trainer: L.Trainer) -> dict[str, float]:
    """``train/steps`` and ``train/tokens`` of the fit that just returned (taken out of the
    Trainer's callback metrics); empty when no ``TrainingCurves`` ran (a peer's own loop)."""
    metrics = trainer.callback_metrics
    keys = [k for k in metrics if k.startswith(TOTALS)]
    return {k.removeprefix(TOTALS): float(metrics.pop(k)) for k in keys}


def take_points(trainer: L.Trainer) -> list[Point]:
    """The points ``TrainingCurves`` handed back (taken out of the Trainer's callback metrics)."""
    metrics = trainer.callback_metrics
    points: list[Point] = []
    for key in [k for k in metrics if k.startswith(HANDOFF)]:
        for step, value in metrics.pop(key).tolist():
            points.append((key.removeprefix(HANDOFF), int(step), float(value)))
    return points
