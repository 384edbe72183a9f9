"""Residual MLP backbone for flattened inputs; with ``moe_blocks`` its FFNs become MoE layers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lifelong_moe.models.ffn import AuxList, check_moe_blocks, make_ffn


class ResidualMLP(nn.Module):
    """x -> linear embed -> n_blocks x (x + FFN(LayerNorm(x))) -> LayerNorm -> class head.

    With ``moe=False`` the same config builds the dense twin (see ``make_ffn``).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        d_model: int = 128,
        d_hidden: int = 256,
        n_blocks: int = 2,
        moe_blocks: Sequence[int] = (),
        moe: bool = True,
        n_experts: int = 4,
        top_k: int = 2,
        router_noise: float = 0.0,
        capacity_factor: float | None = None,
        dispatch: str = "auto",
    ) -> None:
        super().__init__()
        moe_blocks = list(moe_blocks)
        check_moe_blocks(moe_blocks, n_blocks)
        self.embed = nn.Linear(math.prod(input_shape), d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_blocks))
        self.ffns = nn.ModuleList(
            make_ffn(
                d_model,
                d_hidden,
                i in moe_blocks,
                moe,
                n_experts,
                top_k,
                router_noise,
                capacity_factor,
                dispatch,
            )
            for i in range(n_blocks)
        )
        self.norm_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(
        self, x: torch.Tensor, expert_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, AuxList]:
        h = self.embed(x.flatten(1))
        aux: AuxList = []
        for norm, ffn in zip(self.norms, self.ffns, strict=True):
            y, a = ffn(norm(h), expert_mask=expert_mask)
            h = h + y
            if a is not None:
                aux.append(a)
        return self.head(self.norm_out(h)), aux
