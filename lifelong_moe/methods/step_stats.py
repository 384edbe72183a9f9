"""Per-step training statistics kept on the device: the epoch's mean loss and the NaN guard.

Why not ``self.log`` and ``if not torch.isfinite(loss)`` at every step: Lightning's per-step
``log`` moves its whole result collection to the value's device on every call (a fifth of a
small model's CPU step, measured in results/loop_cpu.md), and ``bool(isfinite)`` waits for the
device at every step, which stalls a GPU's queue. Here each step adds a few tensor ops and
never syncs; the host looks at the guard every ``check_every`` steps and at the end of each
epoch, and the error still names the experience and the first step whose loss was not finite.

The sums travel in training checkpoints (``state_dict``): a run resumed in the middle of an epoch
logs the same epoch means as one that was never interrupted.
"""

from __future__ import annotations

from typing import Any

import torch

from lifelong_moe import names
from lifelong_moe.errors import NonFiniteLossError


def _copied(value: Any) -> Any:
    """A list or dict as a new one (its items shared), anything else as it is."""
    return type(value)(value) if isinstance(value, list | dict) else value


class StepStats:
    """Batch-size weighted loss sum and the first non-finite step, both as device tensors."""

    def __init__(self, check_every: int = 50) -> None:
        self.check_every = check_every
        self.reset()

    def reset(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.count = 0
        self.bad_step: torch.Tensor | None = None  # long, -1 while every loss was finite
        self.bad_values: torch.Tensor | None = None  # [loss, *terms] at that step
        self.names: list[str] = []
        # Batch-size weighted sum and count per loss term (train/<term>), also on the device.
        self.term_sums: dict[str, torch.Tensor] = {}
        self.term_counts: dict[str, int] = {}
        self.last: dict[str, torch.Tensor] = {}

    def update(
        self, loss: torch.Tensor, terms: dict[str, torch.Tensor], step: int, batch_size: int
    ) -> None:
        loss = loss.detach().float()
        if self.loss_sum is not None and self.loss_sum.device != loss.device:
            self._to(loss.device)  # restored from a checkpoint read onto another device
        if self.loss_sum is None:
            self.loss_sum = torch.zeros((), device=loss.device)
            self.bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.bad_values = torch.zeros(1 + len(terms), device=loss.device)
            self.names = list(terms)
        # The step's own values, for the training curves (run/curves.py reads them when due).
        self.last = {names.TRAIN_LOSS: loss}
        self.last.update({names.train_term(k): v.detach().float() for k, v in terms.items()})
        self.loss_sum = self.loss_sum + loss * batch_size
        self.count += batch_size
        for k, v in terms.items():
            weighted = v.detach().float() * batch_size
            self.term_sums[k] = self.term_sums[k] + weighted if k in self.term_sums else weighted
            self.term_counts[k] = self.term_counts.get(k, 0) + batch_size
        first = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        if list(terms) == self.names:
            values = torch.stack([loss, *(v.detach().float() for v in terms.values())])
            self.bad_values = torch.where(first, values, self.bad_values)

    def check(self, experience: int | str) -> None:
        """Raise if any loss so far was not finite (one host sync)."""
        if self.bad_step is None or int(self.bad_step) < 0:
            return
        values = self.bad_values.tolist()
        detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.names, values[1:], strict=True))
        raise NonFiniteLossError(
            f"loss became {values[0]} at experience {experience}, step {int(self.bad_step)} "
            f"(terms: {detail})"
        )

    def due(self, batch_idx: int) -> bool:
        return batch_idx % self.check_every == 0

    def term_means(self) -> dict[str, torch.Tensor]:
        """Each term's batch-size weighted mean over the epoch; they sum to :meth:`mean`."""
        return {k: total / self.term_counts[k] for k, total in self.term_sums.items()}

    def mean(self) -> torch.Tensor | None:
        return None if self.loss_sum is None or not self.count else self.loss_sum / self.count

    # The epoch's sums so far; lists and dicts are copied on the way out and in.
    STATE = ("loss_sum", "count", "bad_step", "bad_values", "names", "term_sums", "term_counts")

    def state_dict(self) -> dict[str, Any]:
        """The epoch's sums so far, in types that ``torch.load(weights_only=True)`` reads."""
        return {name: _copied(getattr(self, name)) for name in self.STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.STATE:
            setattr(self, name, _copied(state[name]))

    def _to(self, device: torch.device) -> None:
        self.loss_sum = self.loss_sum.to(device)
        self.bad_step = self.bad_step.to(device)
        self.bad_values = self.bad_values.to(device)
        self.term_sums = {k: v.to(device) for k, v in self.term_sums.items()}

    def epoch_metrics(self) -> dict[str, torch.Tensor]:
        """``train/loss`` and ``train/<term>``: the epoch means the method logs (empty: no step)."""
        mean = self.mean()
        if mean is None:
            return {}
        terms = {names.train_term(k): v for k, v in self.term_means().items()}
        return {names.TRAIN_LOSS: mean, **terms}
