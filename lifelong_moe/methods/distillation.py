"""Distillation terms toward a previous phase: outputs (LwF, Lifelong-MoE) and routing (Lifelong-MoE).

Shared by the methods that regularise toward a teacher, so that no method imports another.
"""

from __future__ import annotations

import torch
from torch import nn


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) on temperature-softened distributions (Hinton et al. 2015)."""
    # Sequence outputs [B, L, V] count every position as one distribution.
    student = student.reshape(-1, student.shape[-1]).float()
    teacher = teacher.reshape(-1, teacher.shape[-1]).float()
    log_p_student = nn.functional.log_softmax(student / temperature, dim=-1)
    log_p_teacher = nn.functional.log_softmax(teacher / temperature, dim=-1)
    kl = nn.functional.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return temperature**2 * kl


def router_distillation(student_aux: list, teacher_aux: list, n_old: int) -> torch.Tensor:
    """Mean over MoE layers of KL(teacher || student) between the routing distributions over
    the n_old old experts (ids 0..n_old-1) on the same tokens; the student's new experts are
    left out, so the term asks the old experts to keep their relative preference, no more."""
    terms = []
    for s, t in zip(student_aux, teacher_aux, strict=True):
        log_p_teacher = nn.functional.log_softmax(t.router_logits[:, :n_old].float(), dim=-1)
        log_p_student = nn.functional.log_softmax(s.router_logits[:, :n_old].float(), dim=-1)
        kl = nn.functional.kl_div(
            log_p_student, log_p_teacher, log_target=True, reduction="batchmean"
        )
        terms.append(kl)
    return torch.stack(terms).mean()
