"""Parameter counts the way MoE papers report them: total, trainable, and active per token."""

from __future__ import annotations

from torch import nn

from lifelong_moe.moe import MoELayer


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """The model's MoE layers by module name, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total includes frozen expert banks (buffers); active = shared + top_k x (expert + gate row).

    That is what a token runs through, so it stays constant as Lifelong-MoE grows. The router
    also scores every expert (d_model multiply-adds per expert per token): negligible, not counted.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    total = trainable + frozen_params
    inactive = 0
    for layer in moe_layers(model).values():
        total += sum(b.numel() for name, b in layer.named_buffers() if "frozen" in name)
        per_expert = layer.experts.w1_width + layer.d_hidden + 1  # w1 columns, w2 rows, gate row
        inactive += (layer.n_experts - layer.top_k) * per_expert * layer.d_model
    active = total - inactive
    # An ensemble that runs only some of its members per input states its own count (SEED).
    if hasattr(model, "active_parameters"):
        active = model.active_parameters()
    return {"total": total, "trainable": trainable, "active": active}
