"""A small byte-level decoder transformer; GLaM-style, the FFN of every other block is MoE.

It reuses the patch transformer's block stack (models/transformer.py) with a causal mask: the only differences
from ``PatchTransformer`` are the byte embedding in front and a per-position head behind.
Logits are ``[B, L, vocab]``: training flattens positions into the batch, so every byte is one
cross-entropy term and the loss is in nats per byte.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.models.transformer import TransformerStack
from lifelong_moe.moe import AuxList, MoESettings


class CausalLM(nn.Module):
    """Tokens [B, L] -> embedding + learned positions -> causal blocks -> LayerNorm -> logits.

    ``input_shape`` is ``(context_length,)`` and ``n_classes`` the vocabulary size, as the stream
    reports them. With ``moe.enabled=False`` the same config builds the dense twin (see
    ``MoESettings.ffn``).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        d_model: int = 128,
        d_hidden: int = 256,
        n_heads: int = 4,
        n_blocks: int = 4,
        moe: MoESettings | None = None,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ConfigError(
                f"model=lm needs token sequences (context_length,), got input shape "
                f"{tuple(input_shape)}; use benchmark=text_domains"
            )
        self.context_length = int(input_shape[0])
        self.embed = nn.Embedding(n_classes, d_model)
        self.position = nn.Parameter(torch.randn(1, self.context_length, d_model) * 0.02)
        nn.init.normal_(self.embed.weight, std=0.02)
        ffns = (moe or MoESettings()).ffns(d_model, d_hidden, n_blocks)
        self.blocks = TransformerStack(d_model, n_heads, ffns)
        self.norm_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(
        self, x: torch.Tensor, expert_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, AuxList]:
        """x: long [B, T] with T <= context_length; logits [B, T, vocab], position t sees <= t."""
        length = x.shape[1]
        if length > self.context_length:
            raise ValueError(f"CausalLM: {length} tokens, at most {self.context_length}")
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        h = self.embed(x) + self.position[:, :length]
        h, aux = self.blocks(h, expert_mask=expert_mask, causal=causal)
        return self.head(self.norm_out(h)), aux
