"""A small patch transformer for image streams; GLaM-style, the FFN of every other block is MoE."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.models.transformer import TransformerStack
from lifelong_moe.moe import AuxList, MoESettings


class PatchTransformer(nn.Module):
    """Images [B, C, H, W] -> non-overlapping patches -> transformer -> mean pool -> class head.

    With ``moe.enabled=False`` the same config builds the dense twin (see ``MoESettings.ffn``).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        patch_size: int = 2,
        d_model: int = 64,
        d_hidden: int = 128,
        n_heads: int = 4,
        n_blocks: int = 4,
        moe: MoESettings | None = None,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(
                f"model=vit needs image inputs (channels, height, width), got input shape {tuple(input_shape)}"
            )
        channels, height, width = input_shape
        if height % patch_size or width % patch_size:
            raise ConfigError(
                f"model.patch_size={patch_size} must divide the image size {height}x{width}"
            )
        n_patches = (height // patch_size) * (width // patch_size)
        self.patch = nn.Conv2d(channels, d_model, kernel_size=patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.randn(1, n_patches, d_model) * 0.02)
        ffns = (moe or MoESettings()).ffns(d_model, d_hidden, n_blocks)
        self.blocks = TransformerStack(d_model, n_heads, ffns)
        self.norm_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(
        self, x: torch.Tensor, expert_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, AuxList]:
        h = self.patch(x).flatten(2).transpose(1, 2) + self.position
        h, aux = self.blocks(h, expert_mask=expert_mask)
        return self.head(self.norm_out(h).mean(1)), aux
