"""Top-k router whose gate rows live in a frozen bank (lowest ids) and a trainable bank.

Frozen rows are a persistent buffer, never a Parameter, so no optimizer (weight decay included)
can touch them. Logits, softmax and both auxiliary losses are computed in fp32 whatever the
model dtype, because routing decisions and the losses are sensitive to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.moe.banks import TwoBanks

BALANCE_SCOPES = ("all", "trainable")
# softmax_topk: softmax over all experts, then the k largest (Switch, OLMoE, Qwen2-MoE; with
# normalize_top_k the k gates are renormalised to sum to 1). topk_softmax: the k largest logits,
# then a softmax over those k alone (Mixtral; always sums to 1, normalize_top_k is moot).
ROUTER_ORDERS = ("softmax_topk", "topk_softmax")
GATE_INITS = ("random", "mean", "zero", "domain")


@dataclass
class Routing:
    """What the router decided for a flat batch of T tokens."""

    expert_ids: torch.Tensor  # long [T, k], original expert ids
    gates: torch.Tensor  # fp32 [T, k]
    valid: torch.Tensor | None  # bool [T, k]; False where a masked expert had to be picked
    balance_loss: torch.Tensor  # fp32 scalar
    z_loss: torch.Tensor  # fp32 scalar
    logits: torch.Tensor | None = None  # fp32 [T, E], x W_g^T before mask and noise
    # bool [E] or [T, E]: the experts the mask left reachable (None = all); routing metrics
    # measure chance against uniform routing over these
    reachable: torch.Tensor | None = None


def _uniform_rows(n: int, d: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """Rows initialised like nn.Linear(d, n).weight: U(-1/sqrt(d), 1/sqrt(d))."""
    kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
    bound = 1.0 / math.sqrt(d)
    return torch.empty(n, d, **kw).uniform_(-bound, bound)


class Router(TwoBanks, nn.Module):
    """logits = x W_g^T in fp32 -> optional noise and mask -> softmax -> top-k -> gates."""

    FROZEN, TRAINABLE = "weight_frozen", "weight"

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        *,
        noise_std: float = 0.0,
        normalize_top_k: bool = True,
        balance_scope: str = "all",
        n_frozen: int = 0,
        order: str = "softmax_topk",
    ) -> None:
        super().__init__()
        if balance_scope not in BALANCE_SCOPES:
            raise ConfigError(f"balance_scope={balance_scope!r}: expected one of {BALANCE_SCOPES}")
        if order not in ROUTER_ORDERS:
            raise ConfigError(f"router_order={order!r}: expected one of {ROUTER_ORDERS}")
        self.order = order
        self.d_model = d_model
        self.top_k = top_k
        self.noise_std = float(noise_std)
        self.normalize_top_k = bool(normalize_top_k)
        self.balance_scope = balance_scope
        self.register_buffer("weight_frozen", _uniform_rows(n_frozen, d_model))
        self.weight = nn.Parameter(_uniform_rows(n_experts - n_frozen, d_model))

    def full_weight(self) -> torch.Tensor:
        """All gate rows in expert-id order (frozen first)."""
        if self.n_frozen == 0:
            return self.weight
        if self.n_trainable == 0:
            return self.weight_frozen
        return torch.cat([self.weight_frozen, self.weight], dim=0)

    def forward(self, x: torch.Tensor, expert_mask: torch.Tensor | None = None) -> Routing:
        """Route a flat batch x [T, d].

        expert_mask: bool [E] or [T, E] (False = never picked), or a float logit bias of the
        same shapes added before top-k (-inf = never picked; a positive entry favours an expert
        without forcing it, as distribution-inferred routing does).
        """
        raw = x.float() @ self.full_weight().float().t()  # [T, E]
        logits, enabled, reachable = raw, None, None
        if expert_mask is not None:
            if expert_mask.dtype == torch.bool:
                logits = raw.masked_fill(~expert_mask, float("-inf"))
                enabled = expert_mask
            else:
                logits = raw + expert_mask.float()
                enabled = torch.isfinite(expert_mask)
            reachable = enabled
            if enabled.dim() == 2:  # per-token masks: an expert is in scope if any token may use it
                enabled = enabled.any(dim=0)
        route_logits = logits
        if self.training and self.noise_std > 0:
            route_logits = logits + torch.randn_like(logits) * self.noise_std
        probs = torch.softmax(route_logits, dim=-1)
        # top-k on logits, not probs: a masked expert (-inf) never ties with an underflowed prob.
        top_logits, expert_ids = torch.topk(route_logits, self.top_k, dim=-1)
        if self.order == "topk_softmax":
            gates = torch.softmax(top_logits, dim=-1)
        else:
            gates = probs.gather(1, expert_ids)
        if self.normalize_top_k and self.order == "softmax_topk":
            gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
        valid = None
        if expert_mask is not None:
            # Fewer enabled experts than k: the surplus slots carry weight 0 and go nowhere.
            valid = torch.isfinite(top_logits)
        if x.shape[0] == 0:  # an empty batch: means over no tokens would be NaN
            zero = logits.new_zeros(())
            return Routing(expert_ids, gates, valid, zero, zero, raw, reachable)
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        balance = self._balance_loss(route_logits, probs, expert_ids, valid, enabled)
        return Routing(expert_ids, gates, valid, balance, z_loss, raw, reachable)

    def _balance_loss(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor,
        expert_ids: torch.Tensor,
        valid: torch.Tensor | None,
        enabled: torch.Tensor | None,
    ) -> torch.Tensor:
        """Switch loss n_S * sum_{i in S} f_i * P_i over the scoped, enabled experts S.

        f_i: share of the (token, slot) assignments into S that picked expert i (router choice,
        before any capacity drop); P_i: mean over tokens of the router probability of i,
        renormalised over S. A uniform router gives exactly 1 for any scope.
        """
        n_tokens, n_experts = logits.shape
        picked = 1.0 if valid is None else valid.float()
        chosen = torch.zeros_like(logits).scatter_(1, expert_ids, picked)  # [T, E]; ids unique
        scope = torch.ones(n_experts, dtype=torch.bool, device=logits.device)
        if self.balance_scope == "trainable":
            if self.n_trainable == 0:
                return logits.new_zeros(())
            scope[: self.n_frozen] = False
        if enabled is not None:
            scope = scope & enabled
        if enabled is None and self.balance_scope == "all":
            p_mean = probs.mean(dim=0)
        else:
            scoped = torch.where(scope, logits, torch.finfo(logits.dtype).min)
            p_mean = torch.softmax(scoped, dim=-1).mean(dim=0) * scope
        counts = chosen.sum(dim=0) * scope
        f = counts / counts.sum().clamp_min(1.0)
        return scope.sum() * (f * p_mean).sum()

    @torch.no_grad()
    def expand(
        self,
        n_new: int,
        init: str = "random",
        noise_std: float = 0.01,
        domain: torch.Tensor | None = None,
    ) -> None:
        """Append n_new trainable gate rows.

        "random": nn.Linear scale; "mean": the mean of the old rows plus N(0, noise_std^2);
        "zero": zeros (new experts start at logit 0, ties broken by the old rows' logits);
        "domain": the mean router input over the new experience's tokens (``domain`` [d], see
        moe/domain.py) plus N(0, noise_std^2), as Nexus and FlexOlmo initialise the router
        embeddings of added experts: tokens of the new domain then score them high.
        """
        if init not in GATE_INITS:
            raise ConfigError(f"gate_init={init!r}: expected one of {GATE_INITS}")
        old = self.full_weight().detach()
        like = self.weight
        if init == "domain":
            if domain is None or domain.shape != (self.d_model,):
                raise ConfigError(
                    f"gate_init='domain': expected the mean router input of shape "
                    f"({self.d_model},), got {None if domain is None else tuple(domain.shape)}"
                )
            new = domain.to(like).expand(n_new, -1).clone()
            new += torch.randn_like(new) * noise_std
        elif init == "zero":
            new = like.new_zeros(n_new, self.d_model)
        elif init == "mean" and old.shape[0] > 0:
            new = old.mean(dim=0, keepdim=True).expand(n_new, -1).clone()
            new += torch.randn_like(new) * noise_std
        else:
            new = _uniform_rows(n_new, self.d_model, like=like)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), new], dim=0))

    @torch.no_grad()
    def freeze_existing(self) -> None:
        """Move every current row into the frozen buffer; the trainable bank becomes empty."""
        self.freeze_first(self.n_experts)

    @torch.no_grad()
    def freeze_first(self, n_frozen: int) -> None:
        """Move rows between the frozen buffer and the trainable Parameter until exactly the
        first ``n_frozen`` are frozen (either direction, ids unchanged)."""
        if not 0 <= n_frozen <= self.n_experts:
            raise ValueError(
                f"freeze_first({n_frozen}): {self.n_frozen} of {self.n_experts} frozen"
            )
        full = self.full_weight().detach()
        self.weight_frozen = full[:n_frozen].clone()
        self.weight = nn.Parameter(full[n_frozen:].clone())
