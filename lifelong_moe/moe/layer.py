"""MoELayer = router + experts + dispatch, and the grow/freeze operations of Lifelong-MoE.

Expert ids are ordered frozen bank first, trainable bank last. expand() appends trainable
experts (and gate rows) at the highest ids; freeze_existing() moves everything into the frozen
banks. Old ids never change, so an expert mask or routing statistics taken before an expansion
stay meaningful after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.moe import fused
from lifelong_moe.moe.dispatch import capacity_for, grouped_experts, loop_experts
from lifelong_moe.moe.experts import EXPERT_INITS, Experts
from lifelong_moe.moe.router import BALANCE_SCOPES, GATE_INITS, Router

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
DISPATCHES = {"grouped": grouped_experts, "loop": loop_experts}
# "fused": Triton kernels (moe/fused.py) on CUDA, grouped elsewhere; "auto": fused on CUDA when
# fused.FUSED_BY_DEFAULT says it is the faster one there, grouped otherwise.
DISPATCH_CHOICES = ("auto", "grouped", "fused", "loop")
# grouped_mm needs 16-byte aligned rows: 8 elements in bf16/fp16 (4 would do in fp32).
ALIGN = 8


@dataclass
class MoEAux:
    """Auxiliary outputs of one forward."""

    balance_loss: torch.Tensor  # fp32 scalar, Switch load-balancing loss (1.0 = uniform)
    z_loss: torch.Tensor  # fp32 scalar, mean of logsumexp(logits)^2
    tokens_per_expert: torch.Tensor  # long [E], (token, slot) assignments kept
    dropped: torch.Tensor  # long scalar, assignments dropped by capacity


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(repr, valid))}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r}: expected a positive integer")


class MoELayer(nn.Module):
    """Sparse top-k mixture of bias-free MLP experts, applied token-wise to x [..., d_model]."""

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        n_experts: int,
        top_k: int,
        *,
        activation: str = "gelu",
        router_noise: float = 0.0,
        normalize_top_k: bool = True,
        balance_scope: str = "all",
        capacity_factor: float | None = None,
        dispatch: str = "auto",
        expand_init: str = "random",
        gate_init: str = "random",
        n_frozen: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("d_hidden", d_hidden),
            ("n_experts", n_experts),
            ("top_k", top_k),
        ):
            _positive_int(name, value)
        if top_k > n_experts:
            raise ConfigError(f"top_k={top_k}: expected at most n_experts={n_experts}")
        _choice("activation", activation, tuple(ACTIVATIONS))
        _choice("dispatch", dispatch, DISPATCH_CHOICES)
        _choice("balance_scope", balance_scope, BALANCE_SCOPES)
        _choice("expand_init", expand_init, EXPERT_INITS)
        _choice("gate_init", gate_init, GATE_INITS)
        if dispatch == "fused":
            fused.check_shapes(d_model, d_hidden, activation)
        if dispatch in ("grouped", "auto"):
            for name, value in (("d_model", d_model), ("d_hidden", d_hidden)):
                if value % ALIGN:
                    raise ConfigError(
                        f"{name}={value}: expected a multiple of {ALIGN} for grouped dispatch "
                        "(grouped_mm alignment); use dispatch='loop' otherwise"
                    )
        if not router_noise >= 0:
            raise ConfigError(f"router_noise={router_noise!r}: expected a number >= 0")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ConfigError(f"capacity_factor={capacity_factor!r}: expected None or > 0")
        if isinstance(n_frozen, bool) or not isinstance(n_frozen, int) or n_frozen < 0:
            raise ConfigError(f"n_frozen={n_frozen!r}: expected an integer >= 0")
        if n_frozen > n_experts:
            raise ConfigError(f"n_frozen={n_frozen}: expected at most n_experts={n_experts}")
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.top_k = top_k
        self.activation = activation
        self.capacity_factor = capacity_factor
        self.dispatch = dispatch
        self.expand_init = expand_init
        self.gate_init = gate_init
        self.router = Router(
            d_model,
            n_experts,
            top_k,
            noise_std=router_noise,
            normalize_top_k=normalize_top_k,
            balance_scope=balance_scope,
            n_frozen=n_frozen,
        )
        self.experts = Experts(d_model, d_hidden, n_experts, n_frozen=n_frozen)
        # Cumulative training assignments per expert, kept on the device (no sync per step).
        self.register_buffer("expert_usage", torch.zeros(n_experts))

    @property
    def n_experts(self) -> int:
        return self.experts.n_experts

    @property
    def n_frozen(self) -> int:
        return self.experts.n_frozen

    @property
    def n_trainable(self) -> int:
        return self.experts.n_trainable

    def forward(
        self, x: torch.Tensor, expert_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEAux]:
        """y has x's shape; expert_mask (bool [n_experts], False = disabled) is never routed to."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer: x has last dim {x.shape[-1]}, expected {self.d_model}")
        if expert_mask is not None:
            if expert_mask.dtype != torch.bool or tuple(expert_mask.shape) != (self.n_experts,):
                raise ConfigError(
                    f"expert_mask: dtype {expert_mask.dtype}, shape {tuple(expert_mask.shape)}; "
                    f"expected bool of shape ({self.n_experts},)"
                )
            expert_mask = expert_mask.to(x.device)
        flat = x.reshape(-1, self.d_model)
        routing = self.router(flat, expert_mask)
        capacity = capacity_for(self.capacity_factor, flat.shape[0], self.top_k, self.n_experts)
        kind = self.resolved_dispatch(flat.device)
        if kind == "fused":
            run, activation = fused.fused_experts, self.activation
        else:
            run, activation = DISPATCHES[kind], ACTIVATIONS[self.activation]
        y, counts, dropped = run(
            flat,
            routing.expert_ids,
            routing.gates,
            routing.valid,
            self.experts,
            activation,
            capacity,
        )
        if self.training:
            self.expert_usage.add_(counts.to(self.expert_usage.dtype))
        aux = MoEAux(routing.balance_loss, routing.z_loss, counts, dropped)
        return y.view(x.shape), aux

    def resolved_dispatch(self, device: torch.device) -> str:
        """The dispatch that runs on `device`: the Triton kernels need CUDA (or the interpreter)
        and 16-aligned widths; everywhere else the grouped_mm path is the reference."""
        if self.dispatch in ("grouped", "loop"):
            return self.dispatch
        aligned = not (self.d_model % fused.ALIGN or self.d_hidden % fused.ALIGN)
        if self.dispatch == "fused":
            return "fused" if fused.runs_on(device) else "grouped"
        cuda_ok = device.type == "cuda" and fused.available()
        return "fused" if cuda_ok and aligned and fused.FUSED_BY_DEFAULT else "grouped"

    @torch.no_grad()
    def expand(
        self,
        n_new: int,
        init: str | None = None,
        gate_init: str | None = None,
        noise_std: float = 0.01,
    ) -> None:
        """Append n_new trainable experts and gate rows (ids n_experts .. n_experts+n_new-1).

        Any optimizer holding the old trainable Parameters must be rebuilt afterwards.
        """
        _positive_int("n_new", n_new)
        init = self.expand_init if init is None else init
        gate_init = self.gate_init if gate_init is None else gate_init
        _choice("init", init, EXPERT_INITS)
        _choice("gate_init", gate_init, GATE_INITS)
        self.experts.expand(n_new, init, noise_std, usage=self.expert_usage)
        self.router.expand(n_new, gate_init, noise_std)
        self.expert_usage = torch.cat([self.expert_usage, self.expert_usage.new_zeros(n_new)])

    @torch.no_grad()
    def freeze_existing(self) -> None:
        """Every current expert and gate row moves to the frozen banks (exactly frozen)."""
        self.experts.freeze_existing()
        self.router.freeze_existing()

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild a layer of the same shape, banks included."""
        return {
            "d_model": self.d_model,
            "d_hidden": self.d_hidden,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "activation": self.activation,
            "router_noise": self.router.noise_std,
            "normalize_top_k": self.router.normalize_top_k,
            "balance_scope": self.router.balance_scope,
            "capacity_factor": self.capacity_factor,
            "dispatch": self.dispatch,
            "expand_init": self.expand_init,
            "gate_init": self.gate_init,
            "n_frozen": self.n_frozen,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MoELayer:
        """A fresh layer of the shape described by get_config(); load a state_dict into it."""
        return cls(**config)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, n_experts={self.n_experts} "
            f"(frozen={self.n_frozen}), top_k={self.top_k}, dispatch={self.dispatch!r}"
        )
