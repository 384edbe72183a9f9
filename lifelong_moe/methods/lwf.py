"""Learning without Forgetting (Li & Hoiem 2016): distill the previous model on the new data.

Before every experience t > 0 a frozen copy of the model (the teacher) is taken; training adds

    lambda_kd * T^2 * KL(teacher || student)

on the current batch, over the logits of the classes seen before t (as Avalanche's LwFPlugin
does with its "active units"): with one shared head, distilling the teacher's near-zero
logits of the new classes would fight the cross-entropy that must raise them. In a
domain-incremental stream every class is old, so every logit is distilled. No growth, no
freezing: the architecture stays fixed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lifelong_moe import checks
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.methods.distillation import distillation
from lifelong_moe.stream import Experience


class LwF(ContinualMethod):
    def __init__(
        self,
        model: nn.Module,
        lambda_kd: float = 1.0,
        temperature: float = 2.0,
        **base: Any,
    ) -> None:
        super().__init__(model, **base)  # lr, weight_decay, replay: ContinualMethod's
        checks.non_negative("method.lambda_kd", lambda_kd)
        checks.positive("method.temperature", temperature)
        self.lambda_kd = lambda_kd
        self.temperature = temperature
        self.teacher: nn.Module | None = None
        self.old_classes: torch.Tensor | None = None

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.teacher, self.old_classes = None, None
        if exp.index == 0 or self.lambda_kd == 0:
            return
        # Outside the module tree (ContinualMethod.__setattr__): it follows the batch's device below.
        self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.teacher_device: torch.device | None = None
        old = sorted({c for e in self.seen[:-1] for c in e.classes})
        # A stream without class lists (empty) distills every logit.
        self.old_classes = torch.tensor(old, dtype=torch.long) if old else None

    def extra_loss(
        self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, aux: list
    ) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            return {}
        if self.teacher_device != x.device:
            self.teacher.to(x.device)
            self.teacher_device = x.device
        with torch.no_grad():
            target = self.teacher(x)[0]
        student = logits
        if self.old_classes is not None:
            old = self.old_classes.to(logits.device)
            student, target = logits.index_select(-1, old), target.index_select(-1, old)
        return {"kd": self.lambda_kd * distillation(student, target, self.temperature)}
