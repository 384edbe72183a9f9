"""A Lifelong-MoE method that records its first optimizer step (``method._target_`` in tests).

At experience 0, step 0 it saves the loss it computed and the gradients the optimizer is about
to use (under DDP: already averaged over the ranks) to ``$FIRST_STEP_PROBE/rank<r>.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lifelong_moe.methods.lifelong_moe import LifelongMoE


class FirstStepProbe(LifelongMoE):
    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.probe_loss = loss.detach().clone()
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.global_step == 0 and self.experience is not None and self.experience.index == 0:
            grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}
            path = Path(os.environ["FIRST_STEP_PROBE"]) / f"rank{self.global_rank}.pt"
            torch.save({"loss": self.probe_loss, "grads": grads}, path)
