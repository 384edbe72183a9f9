"""SEED's predictor: a shared stem, K expert trunks and per-expert class Gaussians.

The model half of SEED (methods/seed.py trains it). It lives with the backbones because a logged
checkpoint rebuilds it (``models.load_model``) without the method.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributions import MultivariateNormal

from lifelong_moe import checks
from lifelong_moe.errors import ConfigError
from lifelong_moe.models.mlp import ResidualMLP
from lifelong_moe.models.params import count_parameters
from lifelong_moe.models.vit import PatchTransformer


# -- splitting our backbones into a shared stem and an expert trunk ----------------------------
class MLPStem(nn.Module):
    def __init__(self, model: ResidualMLP, shared_blocks: int) -> None:
        super().__init__()
        self.embed = model.embed
        self.norms = nn.ModuleList(model.norms[:shared_blocks])
        self.ffns = nn.ModuleList(model.ffns[:shared_blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1))
        for norm, ffn in zip(self.norms, self.ffns, strict=True):
            h = h + ffn(norm(h))[0]
        return h


class MLPTrunk(nn.Module):
    def __init__(self, model: ResidualMLP, shared_blocks: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(model.norms[shared_blocks:])
        self.ffns = nn.ModuleList(model.ffns[shared_blocks:])
        self.norm_out = model.norm_out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for norm, ffn in zip(self.norms, self.ffns, strict=True):
            h = h + ffn(norm(h))[0]
        return self.norm_out(h)


class ViTStem(nn.Module):
    def __init__(self, model: PatchTransformer, shared_blocks: int) -> None:
        super().__init__()
        self.patch, self.position = model.patch, model.position
        self.blocks = nn.ModuleList(list(model.blocks)[:shared_blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2) + self.position
        for block in self.blocks:
            h = block(h)[0]
        return h


class ViTTrunk(nn.Module):
    def __init__(self, model: PatchTransformer, shared_blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(list(model.blocks)[shared_blocks:])
        self.norm_out = model.norm_out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)[0]
        return self.norm_out(h).mean(1)


def split_backbone(model: nn.Module, shared_blocks: int) -> tuple[nn.Module, nn.Module, int]:
    """(shared stem, one expert trunk, feature size) of one of our classification backbones."""
    if isinstance(model, ResidualMLP):
        n_blocks, stem, trunk = len(model.norms), MLPStem, MLPTrunk
    elif isinstance(model, PatchTransformer):
        n_blocks, stem, trunk = len(model.blocks), ViTStem, ViTTrunk
    else:
        raise ConfigError(
            f"method=seed needs model=mlp, moe_mlp, vit or moe_vit, got {type(model).__name__}"
        )
    try:
        checks.integer("method.shared_blocks", shared_blocks, low=0, high=n_blocks - 1)
    except ConfigError as error:
        raise ConfigError(
            f"{error}: the model has {n_blocks} blocks and each expert needs at least one"
        ) from None
    return (
        stem(model, shared_blocks),
        trunk(model, shared_blocks),
        model.norm_out.normalized_shape[0],
    )


# -- Gaussians, expert selection, Bayes ensemble (pure functions) ------------------------------
def bayes_log_probs(
    features: list[torch.Tensor | None],
    means: torch.Tensor,
    covs: torch.Tensor,
    present: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """log of SEED's ensemble confidence [B, C].

    ``features[k]`` [B, d] are expert k's features (None for an expert without Gaussians);
    ``means`` [K, C, d], ``covs`` [K, C, d, d], ``present`` [K, C] (expert k has class c).
    Per expert: softmax(log N(f_k; mu_kc, Sigma_kc) / tau) over the classes it knows; per
    class: the sum over experts divided by the number of experts that know it.
    """
    K, C = present.shape
    batch = next(f for f in features if f is not None).shape[0] if present.any() else 0
    device = means.device
    total = torch.zeros(batch, C, dtype=torch.float64, device=device)
    for k in range(K):
        known = present[k].nonzero().flatten()
        if len(known) == 0:
            continue
        gauss = MultivariateNormal(
            means[k, known].double(), covariance_matrix=covs[k, known].double()
        )
        loglik = gauss.log_prob(features[k].double().unsqueeze(1))  # [B, n_known]
        total[:, known] += torch.softmax(loglik / tau, dim=1)
    confidence = total / present.sum(0).clamp_min(1)
    return confidence.clamp_min(1e-30).log().float()


# -- the ensemble: what the runner evaluates ----------------------------------------------------
class SeedEnsemble(nn.Module):
    """Shared stem + K expert trunks + per-expert class Gaussians (buffers, so they checkpoint).

    In training mode with a task head set, the forward is the selected expert's head over the
    experience's classes, placed in the global class space (other classes at -inf, so the base
    class's cross-entropy is exactly the task-local one). Otherwise it is the Bayes ensemble.
    """

    def __init__(
        self, backbone: nn.Module, n_classes: int, n_experts: int, shared_blocks: int, tau: float
    ) -> None:
        super().__init__()
        self.stem, trunk, self.d_features = split_backbone(backbone, shared_blocks)
        self.experts = nn.ModuleList(copy.deepcopy(trunk) for _ in range(n_experts))
        self.n_classes, self.shared_blocks, self.tau = n_classes, shared_blocks, tau
        d = self.d_features
        self.register_buffer("means", torch.zeros(n_experts, n_classes, d, dtype=torch.float64))
        self.register_buffer(
            "covs", torch.eye(d, dtype=torch.float64).repeat(n_experts, n_classes, 1, 1)
        )
        self.register_buffer("present", torch.zeros(n_experts, n_classes, dtype=torch.bool))
        self.head: nn.Linear | None = None
        self.active = 0
        self.task_classes: torch.Tensor | None = None
        self.last_hidden: torch.Tensor | None = None
        self.last_features: torch.Tensor | None = None

    def get_config(self) -> dict[str, int | float]:
        """The arguments that rebuild this ensemble around a fresh backbone (models.load_model);
        the experts' weights and the Gaussians are in the state dict."""
        return {
            "n_classes": self.n_classes,
            "n_experts": len(self.experts),
            "shared_blocks": self.shared_blocks,
            "tau": self.tau,
        }

    def active_parameters(self) -> int:
        """What one input runs through at test time: the stem and every expert that has
        Gaussians (all K once K experiences are learned), not one expert as in a top-1 MoE."""
        return count_parameters(self.stem)["active"] + sum(
            count_parameters(e)["active"]
            for k, e in enumerate(self.experts)
            if self.present[k].any()
        )

    def features(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return self.experts[expert](self.stem(x))

    def forward(
        self, x: torch.Tensor, expert_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list]:
        h = self.stem(x)
        if self.training and self.head is not None:
            self.last_hidden = h
            self.last_features = self.experts[self.active](h)
            local = self.head(self.last_features)
            logits = local.new_full((len(x), self.n_classes), float("-inf"))
            logits[:, self.task_classes.to(x.device)] = local
            return logits, []
        if not self.present.any():  # nothing fitted yet (the untrained baseline b): uniform
            return h.new_zeros(len(x), self.n_classes), []
        feats = [
            self.experts[k](h) if self.present[k].any() else None for k in range(len(self.experts))
        ]
        return bayes_log_probs(feats, self.means, self.covs, self.present, self.tau), []
