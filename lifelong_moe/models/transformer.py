"""The pre-norm transformer stack shared by the patch transformer and the byte-level LM.

GLaM-style: blocks listed in ``moe_blocks`` get a MoE FFN (or, with ``moe=False``, the dense
twin's FFN of equal active parameters, see ``make_ffn``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.models.ffn import AuxList, check_moe_blocks, make_ffn


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = ffn

    def forward(
        self,
        x: torch.Tensor,
        expert_mask: torch.Tensor | None = None,
        causal: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, object]:
        h = self.norm1(x)
        x = (
            x
            + self.attn(
                h, h, h, attn_mask=causal, need_weights=False, is_causal=causal is not None
            )[0]
        )
        y, aux = self.ffn(self.norm2(x), expert_mask=expert_mask)
        return x + y, aux


class TransformerStack(nn.ModuleList):
    """n_blocks Blocks; forward returns the hidden states and one MoEAux per MoE block.

    A ModuleList, so parameter names stay ``blocks.<i>....`` in the models that hold it.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        n_heads: int,
        n_blocks: int,
        moe_blocks: Sequence[int],
        moe: bool,
        n_experts: int,
        top_k: int,
        router_noise: float,
        capacity_factor: float | None,
        dispatch: str = "auto",
    ) -> None:
        if d_model % n_heads:
            raise ConfigError(
                f"model.d_model={d_model} must be divisible by model.n_heads={n_heads}"
            )
        check_moe_blocks(list(moe_blocks), n_blocks)
        super().__init__(
            Block(
                d_model,
                n_heads,
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
                ),
            )
            for i in range(n_blocks)
        )

    def forward(
        self,
        h: torch.Tensor,
        expert_mask: torch.Tensor | None = None,
        causal: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AuxList]:
        aux: AuxList = []
        for block in self:
            h, a = block(h, expert_mask=expert_mask, causal=causal)
            if a is not None:
                aux.append(a)
        return h, aux
