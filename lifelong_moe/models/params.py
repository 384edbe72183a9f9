"""Parameter counts the way MoE papers report them: total, trainable, and active per token."""

from __future__ import annotations

from torch import nn

from lifelong_moe.moe import MoELayer
from lifelong_moe.moe.expert_parallel import ExpertParallelMoE

MoELayers = MoELayer | ExpertParallelMoE


def moe_layers(model: nn.Module) -> dict[str, MoELayers]:
    """The model's MoE layers by module name, in forward order (sharded ones included:
    trainer.expert_parallel)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayers)}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total includes frozen expert banks (buffers); active = shared + top_k x (expert + gate row).

    That is what a token runs through, so it stays constant as Lifelong-MoE grows. The router
    also scores every expert (d_model multiply-adds per expert per token): negligible, not counted.
    A layer sharded over ranks (expert parallelism) counts the experts of every rank, so the
    counts are the model's, whatever the sharding.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    total = trainable + frozen_params
    inactive = 0
    for layer in moe_layers(model).values():
        experts = layer.experts
        total += sum(b.numel() for name, b in layer.named_buffers() if "frozen" in name)
        weights = (experts.w1_width + experts.d_hidden) * experts.d_model  # one expert's
        if isinstance(layer, ExpertParallelMoE):  # the experts other ranks hold
            other_frozen = layer.n_frozen - experts.n_frozen
            other_trainable = layer.n_experts - layer.n_frozen - experts.n_trainable
            trainable += other_trainable * weights
            total += (other_frozen + other_trainable) * weights
        inactive += (layer.n_experts - layer.top_k) * (weights + experts.d_model)  # + gate row
    active = total - inactive
    # An ensemble that runs only some of its members per input states its own count (SEED).
    if hasattr(model, "active_parameters"):
        active = model.active_parameters()
    return {"total": total, "trainable": trainable, "active": active}
