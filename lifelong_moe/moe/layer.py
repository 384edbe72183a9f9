"""MoELayer = router + experts + dispatch, and the grow/freeze operations of Lifelong-MoE.

Expert ids are ordered frozen bank first, trainable bank last. expand() appends trainable
experts (and gate rows) at the highest ids; freeze_existing() moves everything into the frozen
banks. Old ids never change, so an expert mask or routing statistics taken before an expansion
stay meaningful after it.

Beside the layer: ``MoESettings``, the MoE keys of a model config in one typed object, which
builds every backbone's FFNs (``MoESettings.ffns``): a MoELayer, or ``DenseMLP`` for the dense
twin and for the blocks that are not MoE.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lifelong_moe import checks
from lifelong_moe.errors import ConfigError
from lifelong_moe.moe import fused
from lifelong_moe.moe.balance import BALANCE_LOSSES
from lifelong_moe.moe.banks import TwoBanks
from lifelong_moe.moe.dispatch import capacity_for, grouped_experts, loop_experts
from lifelong_moe.moe.experts import ACTIVATIONS, EXPERT_INITS, Experts, glu
from lifelong_moe.moe.router import BALANCE_SCOPES, GATE_INITS, ROUTER_ORDERS, Router, Routing
from lifelong_moe.moe.shared import SharedExpert

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
    router_logits: torch.Tensor | None = None  # fp32 [T, E], before mask (router distillation)
    # What the router chose, for the routing metrics (evaluation/routing.py): ids [T, k], which
    # slots are real (bool [T, k], None = all) and which experts were reachable ([E] or [T, E]).
    expert_ids: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    reachable: torch.Tensor | None = None

    @classmethod
    def of(cls, routing: Routing, counts: torch.Tensor, dropped: torch.Tensor) -> MoEAux:
        """What a layer returns after dispatching ``routing`` (the full and the sharded layer)."""
        return cls(
            routing.balance_loss,
            routing.z_loss,
            counts,
            dropped,
            routing.logits,
            routing.expert_ids,
            routing.valid,
            routing.reachable,
        )


# What a backbone's forward returns beside the logits: one MoEAux per MoE layer, in order.
AuxList = list[MoEAux]


class MoELayer(TwoBanks, nn.Module):
    """Sparse top-k mixture of bias-free MLP experts, applied token-wise to x [..., d_model]."""

    FROZEN, TRAINABLE = "experts.w1_frozen", "experts.w1"

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
        n_frozen: int = 0,
        gated: bool = False,
        router_order: str = "softmax_topk",
        shared_hidden: int = 0,
        shared_gate: bool = False,
        frozen_dtype: str = "fp32",
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("d_hidden", d_hidden),
            ("n_experts", n_experts),
            ("top_k", top_k),
        ):
            checks.positive_int(name, value)
        if top_k > n_experts:
            raise ConfigError(f"top_k={top_k}: expected at most n_experts={n_experts}")
        checks.choice("activation", activation, ACTIVATIONS)
        checks.choice("dispatch", dispatch, DISPATCH_CHOICES)
        checks.choice("balance_scope", balance_scope, BALANCE_SCOPES)
        checks.choice("router_order", router_order, ROUTER_ORDERS)
        checks.non_negative_int("shared_hidden", shared_hidden)
        if dispatch == "fused":
            fused.check_shapes(d_model, d_hidden, activation, gated)
        if dispatch in ("grouped", "auto"):
            for name, value in (("d_model", d_model), ("d_hidden", d_hidden)):
                if value % ALIGN:
                    raise ConfigError(
                        f"{name}={value}: expected a multiple of {ALIGN} for grouped dispatch "
                        "(grouped_mm alignment); use dispatch='loop' otherwise"
                    )
        checks.non_negative("router_noise", router_noise)
        checks.optional(checks.positive, "capacity_factor", capacity_factor)
        checks.integer("n_frozen", n_frozen, low=0, high=n_experts)
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.top_k = top_k
        self.activation = activation
        self.capacity_factor = capacity_factor
        self.dispatch = dispatch
        self.router = Router(
            d_model,
            n_experts,
            top_k,
            noise_std=router_noise,
            normalize_top_k=normalize_top_k,
            balance_scope=balance_scope,
            n_frozen=n_frozen,
            order=router_order,
        )
        self.experts = Experts(
            d_model, d_hidden, n_experts, n_frozen=n_frozen, gated=gated, frozen_dtype=frozen_dtype
        )
        # Dense always-on branch (Qwen2-MoE's shared expert), optionally behind a sigmoid gate.
        self.shared = (
            SharedExpert(d_model, shared_hidden, activation, gated=shared_gate)
            if shared_hidden
            else None
        )
        # Cumulative training assignments per expert, kept on the device (no sync per step).
        self.register_buffer("expert_usage", torch.zeros(n_experts))

    def forward(
        self, x: torch.Tensor, expert_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEAux]:
        """y has x's shape; expert_mask (bool, False = disabled) is never routed to.

        expert_mask is [n_experts] (every token) or per token, [..., n_experts] broadcastable to
        x's leading dims; a float mask is an additive logit bias (-inf disables), see Router.
        """
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer: x has last dim {x.shape[-1]}, expected {self.d_model}")
        if expert_mask is not None:
            expert_mask = self._token_mask(expert_mask, x)
        flat = x.reshape(-1, self.d_model)
        routing = self.router(flat, expert_mask)
        capacity = capacity_for(self.capacity_factor, flat.shape[0], self.top_k, self.n_experts)
        kind = self.resolved_dispatch(flat.device)
        if kind == "fused":
            run, activation = fused.fused_experts, self.activation
        else:
            run, activation = DISPATCHES[kind], ACTIVATIONS[self.activation]
            if self.experts.gated:
                activation = glu(activation)
        y, counts, dropped = run(
            flat,
            routing.expert_ids,
            routing.gates,
            routing.valid,
            self.experts,
            activation,
            capacity,
        )
        if self.shared is not None:
            y = y + self.shared(flat)
        if self.training:
            self.expert_usage.add_(counts.to(self.expert_usage.dtype))
        return y.view(x.shape), MoEAux.of(routing, counts, dropped)

    def _token_mask(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[E] stays as it is; a per-token mask [..., E] becomes [T, E] in x's token order."""
        shape = tuple(mask.shape)
        kind_ok = mask.dtype == torch.bool or mask.dtype.is_floating_point
        shape_ok = len(shape) >= 1 and shape[-1] == self.n_experts
        if shape_ok and len(shape) > 1:
            try:
                mask = mask.expand(*x.shape[:-1], self.n_experts)
            except RuntimeError:
                shape_ok = False
        if not (kind_ok and shape_ok):
            raise ConfigError(
                f"expert_mask: dtype {mask.dtype}, shape {shape}; expected bool or float of shape "
                f"({self.n_experts},) or per token (..., {self.n_experts}) for x of shape "
                f"{tuple(x.shape)}"
            )
        mask = mask.to(x.device)
        return mask if mask.dim() == 1 else mask.reshape(-1, self.n_experts)

    def resolved_dispatch(self, device: torch.device) -> str:
        """The dispatch that runs on `device`: the Triton kernels need CUDA (or the interpreter)
        and 16-aligned widths; everywhere else the grouped_mm path is the reference."""
        if self.dispatch in ("grouped", "loop") or self.experts.gated:
            return "loop" if self.dispatch == "loop" else "grouped"
        aligned = not (self.d_model % fused.ALIGN or self.d_hidden % fused.ALIGN)
        if self.dispatch == "fused":
            return "fused" if fused.runs_on(device) else "grouped"
        cuda_ok = device.type == "cuda" and fused.available()
        return "fused" if cuda_ok and aligned and fused.FUSED_BY_DEFAULT else "grouped"

    @torch.no_grad()
    def expand(
        self,
        n_new: int,
        init: str = "random",
        gate_init: str = "mean",
        noise_std: float = 0.01,
        domain: torch.Tensor | None = None,
    ) -> None:
        """Append n_new trainable experts and gate rows (ids n_experts .. n_experts+n_new-1).

        ``init`` (EXPERT_INITS) and ``gate_init`` (GATE_INITS) default to what method=lifelong_moe
        uses; the method passes its config's choice at every expansion. Any optimizer holding
        the old trainable Parameters must be rebuilt afterwards.
        """
        checks.positive_int("n_new", n_new)
        checks.choice("init", init, EXPERT_INITS)
        checks.choice("gate_init", gate_init, GATE_INITS)
        self.experts.expand(n_new, init, noise_std, usage=self.expert_usage)
        self.router.expand(n_new, gate_init, noise_std, domain=domain)
        self.expert_usage = torch.cat([self.expert_usage, self.expert_usage.new_zeros(n_new)])

    @torch.no_grad()
    def freeze_existing(self) -> None:
        """Every current expert and gate row moves to the frozen banks (exactly frozen)."""
        self.experts.freeze_existing()
        self.router.freeze_existing()

    @torch.no_grad()
    def freeze_first(self, n_frozen: int) -> None:
        """The first ``n_frozen`` experts and gate rows frozen, the rest trainable (ids kept)."""
        self.experts.freeze_first(n_frozen)
        self.router.freeze_first(n_frozen)

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
            "n_frozen": self.n_frozen,
            "gated": self.experts.gated,
            "router_order": self.router.order,
            "shared_hidden": 0 if self.shared is None else self.shared.d_hidden,
            "shared_gate": self.shared is not None and self.shared.gate is not None,
            "frozen_dtype": self.experts.frozen_dtype,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MoELayer:
        """A fresh layer of the shape described by get_config(); load a state_dict into it.

        Older checkpoints also hold ``expand_init`` and ``gate_init``, former constructor
        arguments that method=lifelong_moe always overrode at expand(): they are dropped.
        """
        legacy = ("expand_init", "gate_init")
        return cls(**{k: v for k, v in config.items() if k not in legacy})

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, n_experts={self.n_experts} "
            f"(frozen={self.n_frozen}), top_k={self.top_k}, dispatch={self.dispatch!r}"
        )


class DenseMLP(nn.Module):
    """Two bias-free linear maps with GELU: the dense twin of k active experts of width h.

    It takes (and ignores) ``expert_mask`` and returns ``(y, None)`` so that blocks call every
    FFN alike, dense or MoE, and never branch on its kind.
    """

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden, bias=False)
        self.fc2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(
        self, x: torch.Tensor, expert_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        return self.fc2(F.gelu(self.fc1(x))), None


@dataclass
class MoESettings:
    """The MoE keys of a model config, validated, in one object every backbone receives.

    The config keys stay flat (``model.n_experts=8``); ``CONFIG_KEYS`` maps them to the fields
    (``model.moe`` is ``enabled``, ``model.moe_blocks`` is ``blocks``). ``enabled=False`` builds
    the dense twin from the same config, see ``ffn``.
    """

    enabled: bool = True
    blocks: Sequence[int] = ()
    n_experts: int = 4
    top_k: int = 2
    router_noise: float = 0.0
    capacity_factor: float | None = None
    dispatch: str = "auto"
    # Family semantics of real MoE LMs (defaults = the toolkit's own MLP experts):
    activation: str = "gelu"
    gated: bool = False  # SwiGLU experts: act(x Wg) * (x Wu) -> Wd
    normalize_top_k: bool = True  # renormalise the k gates (softmax_topk only)
    router_order: str = "softmax_topk"  # or topk_softmax (Mixtral), see router.ROUTER_ORDERS
    shared_hidden: int = 0  # > 0: a shared expert of this width beside the routed ones
    shared_gate: bool = False  # the shared expert behind a sigmoid gate (Qwen2-MoE)
    # switch: the toolkit's per-layer Switch loss; transformers: the families' own, pooled over
    # layers (moe/balance.py; model=hf_moe only)
    balance_loss: str = "switch"
    # all: the Switch balance loss over every expert; trainable: over the new ones only (until
    # issue 21 this was method.balance_scope)
    balance_scope: str = "all"

    CONFIG_KEYS: ClassVar[dict[str, str]] = {
        "moe": "enabled",
        "moe_blocks": "blocks",
        "n_experts": "n_experts",
        "top_k": "top_k",
        "router_noise": "router_noise",
        "capacity_factor": "capacity_factor",
        "dispatch": "dispatch",
        "activation": "activation",
        "gated": "gated",
        "normalize_top_k": "normalize_top_k",
        "router_order": "router_order",
        "shared_hidden": "shared_hidden",
        "shared_gate": "shared_gate",
        "balance_loss": "balance_loss",
        "balance_scope": "balance_scope",
    }

    def __post_init__(self) -> None:
        checks.boolean("model.moe", self.enabled)
        if not isinstance(self.blocks, list | tuple) or not all(map(checks.is_int, self.blocks)):
            raise ConfigError(f"model.moe_blocks={self.blocks!r}: expected a list of block indices")
        checks.positive_int("model.n_experts", self.n_experts)
        checks.positive_int("model.top_k", self.top_k)
        if self.top_k > self.n_experts:
            raise ConfigError(
                f"model.top_k={self.top_k}: expected at most model.n_experts={self.n_experts}"
            )
        checks.non_negative("model.router_noise", self.router_noise)
        checks.optional(checks.positive, "model.capacity_factor", self.capacity_factor)
        checks.choice("model.dispatch", self.dispatch, DISPATCH_CHOICES)
        checks.choice("model.activation", self.activation, ACTIVATIONS)
        checks.boolean("model.gated", self.gated)
        checks.boolean("model.normalize_top_k", self.normalize_top_k)
        checks.choice("model.router_order", self.router_order, ROUTER_ORDERS)
        checks.non_negative_int("model.shared_hidden", self.shared_hidden)
        checks.boolean("model.shared_gate", self.shared_gate)
        checks.choice("model.balance_loss", self.balance_loss, BALANCE_LOSSES)
        checks.choice("model.balance_scope", self.balance_scope, BALANCE_SCOPES)
        if self.gated and self.dispatch == "fused":
            raise ConfigError(fused.GATED_REFUSAL)

    @classmethod
    def split(cls, node: Mapping[str, Any]) -> tuple[MoESettings, dict[str, Any]]:
        """A flat model config -> (its MoE settings, the backbone's own keys)."""
        rest = dict(node)
        found = {cls.CONFIG_KEYS[k]: rest.pop(k) for k in list(rest) if k in cls.CONFIG_KEYS}
        return cls(**found), rest

    @classmethod
    def config_annotations(cls) -> dict[str, Any]:
        """(flat config key -> type) of the keys this object consumes (the config schema)."""
        hints = typing.get_type_hints(cls)
        return {key: hints[name] for key, name in cls.CONFIG_KEYS.items()}

    def ffns(self, d_model: int, d_hidden: int, n_blocks: int) -> Iterator[nn.Module]:
        """The FFNs of blocks 0..n_blocks-1, built lazily as the caller consumes them.

        Lazy so that a backbone building block by block (FFN, then attention) draws its
        initial weights from the RNG in that order.
        """
        bad = [b for b in self.blocks if not 0 <= b < n_blocks]
        if bad:
            raise ConfigError(
                f"model.moe_blocks={list(self.blocks)} names blocks outside 0..{n_blocks - 1} "
                f"(model.n_blocks={n_blocks})"
            )
        return (self.ffn(d_model, d_hidden, i) for i in range(n_blocks))

    def ffn(self, d_model: int, d_hidden: int, block_index: int) -> nn.Module:
        """The FFN of one block.

        Blocks listed in ``blocks`` get a MoE layer of ``n_experts`` experts of width
        ``d_hidden`` when ``enabled``, and otherwise a dense FFN of width ``top_k * d_hidden``:
        the dense twin then has the same active parameters per token (up to the router's
        ``d_model x n_experts`` gate). Other blocks are dense of width ``d_hidden`` in both.
        """
        if block_index not in self.blocks:
            return DenseMLP(d_model, d_hidden)
        if not self.enabled:
            return DenseMLP(d_model, self.top_k * d_hidden)
        if self.balance_loss != "switch":
            raise ConfigError(
                f"model.balance_loss={self.balance_loss!r}: pooled over layers by model=hf_moe "
                "only; expected 'switch' for this backbone"
            )
        return MoELayer(
            d_model,
            d_hidden,
            self.n_experts,
            self.top_k,
            router_noise=self.router_noise,
            capacity_factor=self.capacity_factor,
            dispatch=self.dispatch,
            activation=self.activation,
            normalize_top_k=self.normalize_top_k,
            gated=self.gated,
            router_order=self.router_order,
            shared_hidden=self.shared_hidden,
            shared_gate=self.shared_gate,
            balance_scope=self.balance_scope,
        )
