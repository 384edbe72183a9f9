"""The pre-norm transformer stack shared by the patch transformer and the byte-level LM.

The blocks take their FFNs from the backbone, which builds them from its ``MoESettings``
(GLaM-style: a MoE layer in the blocks of ``moe.blocks``, dense elsewhere).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.moe import AuxList


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + FFN(LN(x)).

    ``ffn`` is a MoELayer or a DenseMLP: both take ``expert_mask`` and return ``(y, aux)``.
    """

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
    """One Block per FFN; forward returns the hidden states and one MoEAux per MoE block.

    ``ffns`` comes from the backbone (``MoESettings.ffns``) and is consumed lazily, each FFN
    just before its block's attention, so weights are initialised block by block. A
    ModuleList, so parameter names stay ``blocks.<i>....`` in the models that hold it.
    """

    def __init__(self, d_model: int, n_heads: int, ffns: Iterable[nn.Module]) -> None:
        if d_model % n_heads:
            raise ConfigError(
                f"model.d_model={d_model} must be divisible by model.n_heads={n_heads}"
            )
        super().__init__(Block(d_model, n_heads, ffn) for ffn in ffns)

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
