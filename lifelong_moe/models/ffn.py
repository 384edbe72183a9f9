"""The feed-forward sublayer of every backbone: dense, or a MoE layer with the same call shape.

Both return ``(y, aux)`` so blocks never branch on the kind of FFN; ``aux`` is ``None`` for dense.
"""

from __future__ import annotations

import torch
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.moe import MoEAux, MoELayer


class DenseFFN(nn.Module):
    """Two bias-free linear maps with GELU: the dense twin of k active experts of width h."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden, bias=False)
        self.fc2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(
        self, x: torch.Tensor, expert_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        return self.fc2(nn.functional.gelu(self.fc1(x))), None


def make_ffn(
    d_model: int,
    d_hidden: int,
    sparse_block: bool,
    moe: bool,
    n_experts: int,
    top_k: int,
    router_noise: float,
    capacity_factor: float | None,
    dispatch: str = "auto",
) -> nn.Module:
    """The FFN of one block.

    Blocks listed in ``moe_blocks`` get a MoE layer of ``n_experts`` experts of width
    ``d_hidden`` when ``moe`` is true, and otherwise a dense FFN of width ``top_k * d_hidden``:
    the dense twin then has the same active parameters per token (up to the router's
    ``d_model x n_experts`` gate). Other blocks are dense of width ``d_hidden`` in both.
    ``dispatch`` picks the MoE layer's kernel path (auto, grouped, fused, loop; see MoELayer).
    """
    if not sparse_block:
        return DenseFFN(d_model, d_hidden)
    if moe:
        return MoELayer(
            d_model,
            d_hidden,
            n_experts,
            top_k,
            router_noise=router_noise,
            capacity_factor=capacity_factor,
            dispatch=dispatch,
        )
    return DenseFFN(d_model, top_k * d_hidden)


def check_moe_blocks(moe_blocks: list[int], n_blocks: int) -> None:
    bad = [b for b in moe_blocks if not 0 <= b < n_blocks]
    if bad:
        raise ConfigError(
            f"model.moe_blocks={moe_blocks} names blocks outside 0..{n_blocks - 1} "
            f"(model.n_blocks={n_blocks})"
        )


AuxList = list[MoEAux]
