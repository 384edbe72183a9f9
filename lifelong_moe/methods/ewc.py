"""Online EWC (Schwarz et al. 2018, "Progress & Compress"): one running Fisher, one anchor.

After experience t the method estimates the Fisher information F_t on that experience's
training data and folds it into a running importance ``F* = gamma * F* + F_t``; the anchor
``theta*`` becomes the weights at the end of t. Training on later experiences adds

    lambda_ewc / 2 * sum_i F*_i (theta_i - theta*_i)^2

Fisher estimate: the empirical Fisher from mini-batch gradients, the mean over batches of the
squared gradient of the batch-mean cross-entropy at the true labels (what Avalanche's EWCPlugin
computes). It is cheap and works with any backbone (per-sample gradients would need vmap, which
the MoE dispatch does not support); its scale shrinks with ``fisher_batch_size``, which
``lambda_ewc`` absorbs. Only cross-entropy enters it, not the MoE auxiliary losses.

Parameters that appear, disappear or change shape between experiences (a growing MoE) are
not penalised: only those present in both the anchor and the model with equal shapes are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lifelong_moe import checks
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.stream import Experience


class EWC(ContinualMethod):
    def __init__(
        self,
        model: nn.Module,
        lambda_ewc: float = 1e4,
        gamma: float = 1.0,
        fisher_batch_size: int = 32,
        **base: Any,
    ) -> None:
        super().__init__(model, **base)  # lr, weight_decay, replay: ContinualMethod's
        checks.non_negative("method.lambda_ewc", lambda_ewc)
        checks.number("method.gamma", gamma, low=0, high=1, low_open=True)
        checks.positive_int("method.fisher_batch_size", fisher_batch_size)
        self.lambda_ewc = lambda_ewc
        self.gamma = gamma
        self.fisher_batch_size = fisher_batch_size
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def after_experience(self, exp: Experience) -> None:
        super().after_experience(exp)
        fisher = self.estimate_fisher(exp.train)
        params = dict(self.model.named_parameters())
        updated = {}
        for name, f in fisher.items():
            old = self.fisher.get(name)
            same = old is not None and old.shape == f.shape
            updated[name] = self.gamma * old.to(f.device) + f if same else f
        self.fisher = updated
        self.anchor = {name: params[name].detach().clone() for name in updated}

    def estimate_fisher(self, data: Dataset) -> dict[str, torch.Tensor]:
        """Empirical Fisher (mean squared mini-batch gradient) of every trainable parameter."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not params:
            return {}
        device = next(iter(params.values())).device
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        # Own generator: iterating a loader draws a seed, which must not shift the global RNG.
        loader = DataLoader(
            data, batch_size=self.fisher_batch_size, shuffle=False, generator=torch.Generator()
        )
        was_training = self.model.training
        self.model.eval()
        n_batches = 0
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            self.model.zero_grad(set_to_none=True)
            logits = self.model(x)[0]
            # Sequence outputs [B, L, V] count every position as one prediction.
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2
            n_batches += 1
        self.model.zero_grad(set_to_none=True)
        self.model.train(was_training)
        return {n: f / max(n_batches, 1) for n, f in fisher.items()}

    def penalty(self) -> torch.Tensor:
        """``sum F* (theta - theta*)^2`` over parameters whose shape has not changed."""
        total = torch.zeros((), device=self.device)
        for name, p in self.model.named_parameters():
            f = self.fisher.get(name)
            if f is None or f.shape != p.shape:
                continue
            if f.device != p.device:  # moved once: Lightning places the model after loading
                self.fisher[name] = f = f.to(p.device)
                self.anchor[name] = self.anchor[name].to(p.device)
            total = total + (f * (p - self.anchor[name]) ** 2).sum()
        return total

    def extra_loss(
        self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, aux: list
    ) -> dict[str, torch.Tensor]:
        if not self.fisher or self.lambda_ewc == 0:
            return {}
        return {"ewc": self.lambda_ewc / 2 * self.penalty()}

    def method_state(self) -> dict[str, Any]:
        return super().method_state() | {
            "fisher": {n: t.cpu() for n, t in self.fisher.items()},
            "anchor": {n: t.cpu() for n, t in self.anchor.items()},
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        super().load_method_state(state)
        self.fisher = dict(state.get("fisher", {}))
        self.anchor = dict(state.get("anchor", {}))
