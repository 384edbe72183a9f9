"""An example of your own method: fine-tuning with an L2 pull toward the previous weights.

Before every experience t > 0 the trainable weights are copied (the anchor); training adds

    strength * sum_p ||p - anchor_p||^2

to the cross-entropy: EWC with every weight equally important (L2-init). Run it from this
directory's configs (``method/my_method.yaml`` names this class as its ``_target_``):

    lifelong-moe --config-dir experiments/own_method method=my_method

lifelong-moe puts the config directory on ``sys.path``, so ``my_method`` imports from here.
"""

from __future__ import annotations

import torch
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.stream import Experience


class MyMethod(ContinualMethod):
    """Cross-entropy plus ``strength`` times the squared distance to the previous weights."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, strength: float = 1.0) -> None:
        super().__init__(model, lr=lr)
        if strength < 0:  # the config's keys and types are checked from this signature already
            raise ConfigError(f"method.strength={strength}: expected a number >= 0")
        self.strength = strength
        self.anchor: dict[str, torch.Tensor] = {}

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        if exp.index == 0 or self.strength == 0:
            self.anchor = {}
            return
        trainable = self.model.named_parameters()
        self.anchor = {n: p.detach().clone() for n, p in trainable if p.requires_grad}

    def extra_loss(
        self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, aux: list
    ) -> dict[str, torch.Tensor]:
        if not self.anchor:
            return {}
        params = dict(self.model.named_parameters())
        pull = sum(
            (params[n] - a.to(params[n].device)).pow(2).sum() for n, a in self.anchor.items()
        )
        return {"anchor": self.strength * pull}
