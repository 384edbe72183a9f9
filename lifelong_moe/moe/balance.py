"""The load-balancing loss as transformers computes it for OLMoE, Qwen2-MoE and Mixtral.

The toolkit's own loss (router.py, ``balance_loss="switch"``) is Switch's per layer: E * sum_i
f_i P_i with f_i the share of assignments, summed over layers by the methods. transformers'
``load_balancing_loss_func`` (models/*/modeling_*.py, checked on transformers 5.25) differs in
two ways that change its value: f_i counts top-k assignments per token (so it sums to k, not 1),
and both f and P are pooled over all layers before the product:

    aux = E * sum_i (sum_l c_li / (L T)) * (sum_l P_li / L),   c_li = top-k picks of i in layer l

over the raw router logits (no expert mask, no noise). With ``balance_loss="transformers"`` a
model writes aux / L into each layer's ``balance_loss``, so the methods' sum over layers is
exactly transformers' ``aux_loss`` and ``method.lambda_aux`` plays ``router_aux_loss_coef``.
transformers adds no router z-loss for these families; the toolkit's (router.py) stays separate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

BALANCE_LOSSES = ("switch", "transformers")


def transformers_balance_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """transformers' pooled load-balancing loss over layers' raw logits [T, E] (equal E)."""
    n_experts = router_logits[0].shape[-1]
    counts = torch.zeros(n_experts, device=router_logits[0].device)
    prob_sum = torch.zeros(n_experts, device=router_logits[0].device)
    rows = 0
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        picked = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        counts = counts + torch.bincount(picked, minlength=n_experts).float()
        prob_sum = prob_sum + probs.sum(dim=0)
        rows += probs.shape[0]
    return n_experts * torch.sum((counts / rows) * (prob_sum / rows))


def pool_balance(aux: list[Any], top_k: int) -> list[Any]:
    """The same aux (one MoEAux per layer) with each layer's balance_loss = transformers' pooled
    loss / n_layers."""
    logits = [a.router_logits for a in aux]
    if not aux or any(x is None or x.shape[0] == 0 for x in logits):
        return aux
    share = transformers_balance_loss(logits, top_k) / len(aux)
    return [dataclasses.replace(a, balance_loss=share) for a in aux]
