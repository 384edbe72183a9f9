"""A dense backbone with one output head per experience: the model of ``method=dense_heads``.

The backbone's own ``head`` (a Linear on the final features; ``mlp`` and ``lm`` have one) becomes
head 0; the method appends one head per later experience. Which head an input uses is given the
way an MoE model is told which experts it may use, through ``expert_mask``: the heads are this
model's experts, and each input (each position, for a language model) goes to the head the mask
scores highest (a one-hot bool ``[..., n_heads]``, or ``[n_heads]`` for the whole batch). Without
a mask every input uses the newest head. The method that trains it (methods/dense_heads.py)
supplies the mask from the inferred experience; a checkpoint loaded without the method
(``models.load_model``) predicts with the newest head unless given one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.models.params import count_parameters

HEAD_INITS = ("copy", "random")


class ExperienceHeads(nn.Module):
    """``backbone`` with its ``head`` replaced by ``n_heads`` heads (head 0 is the backbone's)."""

    def __init__(self, backbone: nn.Module, n_heads: int = 1) -> None:
        super().__init__()
        head = getattr(backbone, "head", None)
        if not isinstance(head, nn.Linear):
            raise ConfigError(
                f"method=dense_heads needs a backbone with a linear output head (model=mlp or "
                f"model=lm), got {type(backbone).__name__}"
            )
        backbone.head = nn.Identity()  # the backbone now returns its final features
        self.backbone = backbone
        self.heads = nn.ModuleList([head])
        for _ in range(n_heads - 1):
            self.add_head("copy")
        # A state dict with more heads (a resumed run, a logged checkpoint) grows this one first.
        self.register_load_state_dict_pre_hook(_grow_to_state)

    def add_head(self, init: str) -> None:
        """Append a trainable head: a copy of the newest one, or freshly initialised."""
        new = copy.deepcopy(self.heads[-1])
        if init == "random":
            new.reset_parameters()
        new.requires_grad_(True)
        self.heads.append(new)

    def freeze_heads(self) -> None:
        """Every existing head stops training (its weights stay bit-identical)."""
        self.heads.requires_grad_(False)

    def get_config(self) -> dict[str, int]:
        """What ``models.load_model`` rebuilds the wrapper with."""
        return {"n_heads": len(self.heads)}

    def active_parameters(self) -> int:
        """What one input runs through: the backbone and one head."""
        return count_parameters(self.backbone)["active"] + sum(
            p.numel() for p in self.heads[0].parameters()
        )

    def forward(
        self, x: torch.Tensor, expert_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list]:
        h, aux = self.backbone(x)
        if expert_mask is None:
            return self.heads[-1](h), aux
        choice = expert_mask.float().argmax(dim=-1).to(h.device)
        if choice.dim() == 0:
            return self.heads[int(choice)](h), aux
        # One head per input: each head runs on its own inputs only.
        out = h.new_empty(*h.shape[:-1], self.heads[0].out_features)
        for j, head in enumerate(self.heads):
            chosen = choice == j
            if chosen.any():
                out[chosen] = head(h[chosen])
        return out, aux


def _grow_to_state(module: ExperienceHeads, state: dict, prefix: str, *args: object) -> None:
    """Load-state-dict pre-hook: as many heads as the state holds, before its weights load."""
    stored = {
        key[len(prefix) + len("heads.") :].split(".")[0]
        for key in state
        if key.startswith(prefix + "heads.")
    }
    while len(module.heads) < len(stored):
        module.add_head("copy")
