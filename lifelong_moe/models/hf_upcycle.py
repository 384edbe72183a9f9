"""Sparse upcycling (Komatsuzaki et al., 2023): a dense Hugging Face LM's MLPs become MoE layers.

``model=hf_moe model.pretrained=<dense dir> model.upcycle_experts=E model.upcycle_top_k=k`` turns
every dense SwiGLU MLP (Llama, Qwen2, OLMo, Mistral and kin: Linear ``gate_proj``, ``up_proj``,
``down_proj``, ``down(act(gate(x)) * up(x))``) into E copies of itself in the toolkit's gated
two-bank layout (w1 = [gate | up], w2 = down, transposed) behind a new, randomly initialised
router: softmax over the E experts, top-k, the chosen weights renormalised to sum to 1. With
identical copies the layer's output is then the dense MLP's output (the weights sum to one), so
the upcycled model's logits equal the dense model's at step 0 whatever the router says; the
router and the copies diverge in training. ``upcycle_noise`` perturbs each copy by that fraction
of each weight tensor's own standard deviation (0: exact copies, the default).

Like the MoE families, the structure is detected from the modules, not from a list of names.
"""

from __future__ import annotations

import torch
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.moe import MoELayer, MoESettings

DENSE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def is_dense_mlp(module: nn.Module) -> bool:
    """A SwiGLU-style MLP: Linear gate_proj, up_proj and down_proj children."""
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in DENSE_PROJECTIONS)


def find_dense_mlps(hf_model: nn.Module) -> list[str]:
    """Module paths of the dense gated MLPs (outermost ones only), in model order."""
    found: list[str] = []
    for path, module in hf_model.named_modules():
        if is_dense_mlp(module) and not any(path.startswith(f"{p}.") for p in found):
            found.append(path)
    return found


def check_upcycle(n_experts: object, top_k: object, noise: object) -> tuple[int, int, float]:
    """model.upcycle_* values, each bad one a one-line ConfigError."""
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ConfigError(f"model.upcycle_experts={n_experts!r}: expected an integer >= 1")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise ConfigError(
            f"model.upcycle_top_k={top_k!r}: expected an integer in [1, model.upcycle_experts="
            f"{n_experts}]"
        )
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not noise >= 0:
        raise ConfigError(f"model.upcycle_noise={noise!r}: expected a number >= 0")
    return n_experts, top_k, float(noise)


def moe_from_dense(
    mlp: nn.Module,
    activation: str,
    n_experts: int,
    top_k: int,
    noise: float,
    settings: MoESettings,
    where: str,
) -> MoELayer:
    """A MoELayer of ``n_experts`` copies of ``mlp`` (plus noise) behind a random router."""
    gate, up, down = (getattr(mlp, n) for n in DENSE_PROJECTIONS)
    biased = [n for n in DENSE_PROJECTIONS if getattr(mlp, n).bias is not None]
    if biased:
        raise ConfigError(
            f"model.upcycle_experts: {where}.{biased[0]} has a bias; expected bias-free "
            "gate_proj / up_proj / down_proj (the experts have no biases)"
        )
    d_model, d_hidden = gate.in_features, gate.out_features
    layer = MoELayer(
        d_model,
        d_hidden,
        n_experts,
        top_k,
        activation=activation,
        router_noise=settings.router_noise,
        normalize_top_k=True,
        capacity_factor=settings.capacity_factor,
        dispatch=settings.dispatch,
        gated=True,
        router_order="softmax_topk",
    )
    dtype = gate.weight.dtype
    layer.to(dtype)
    w1 = torch.cat([gate.weight, up.weight], dim=0).t()  # [d, 2h]: [gate | up]
    w2 = down.weight.t()  # [h, d]
    with torch.no_grad():
        for bank, weight in ((layer.experts.w1, w1), (layer.experts.w2, w2)):
            copies = weight.detach().unsqueeze(0).repeat(n_experts, 1, 1)
            if noise > 0:
                copies += torch.randn_like(copies) * (weight.detach().std() * noise)
            bank.copy_(copies)
    layer.expert_usage = layer.expert_usage.float()
    return layer
