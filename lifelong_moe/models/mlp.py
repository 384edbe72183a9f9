"""Residual MLP backbone for flattened inputs; the FFNs in ``moe.blocks`` become MoE layers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lifelong_moe.moe import AuxList, MoESettings


class ResidualMLP(nn.Module):
    """x -> linear embed -> n_blocks x (x + FFN(LayerNorm(x))) -> LayerNorm -> class head.

    With ``moe.enabled=False`` the same config builds the dense twin (see ``MoESettings.ffn``).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        d_model: int = 128,
        d_hidden: int = 256,
        n_blocks: int = 2,
        moe: MoESettings | None = None,
    ) -> None:
        super().__init__()
        ffns = (moe or MoESettings()).ffns(d_model, d_hidden, n_blocks)
        self.embed = nn.Linear(math.prod(input_shape), d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_blocks))
        self.ffns = nn.ModuleList(ffns)
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
