"""Shared experts: a dense gated MLP every token goes through, beside the routed experts.

Qwen2-MoE puts one such branch in every sparse block, scaled per token by a sigmoid gate
``sigmoid(x w_g)``; DeepSeek-style blocks use it ungated. It holds no routing state, so growth
never touches it: it is one of the shared (non-expert) weights a method may train or freeze.
"""

from __future__ import annotations

import torch
from torch import nn

from lifelong_moe.moe.experts import ACTIVATIONS


class SharedExpert(nn.Module):
    """y = down(act(x W_gate) * (x W_up)) [* sigmoid(x w_g) when ``gated``], all bias-free."""

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        activation: str,
        *,
        gated: bool = False,
    ) -> None:
        super().__init__()
        self.d_hidden = d_hidden
        self.activation = activation  # a name of ACTIVATIONS (a module must pickle)
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)
        self.gate = nn.Linear(d_model, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down_proj(ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return y
