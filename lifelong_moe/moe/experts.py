"""Stacked expert weights in two banks: frozen (lowest ids, buffers) and trainable (Parameters).

Each expert is a bias-free MLP x -> act(x @ w1[e]) @ w2[e] with w1 [d, h] and w2 [h, d], stored
stacked as [E, d, h] and [E, h, d]: exactly the layout grouped_mm takes as its right operand.
A gated (SwiGLU-style) expert keeps the same two banks: w1 holds [gate | up] concatenated on the
last dim, [E, d, 2h], and the activation becomes ``act(a[..., :h]) * a[..., h:]`` (see ``glu``),
so every dispatch path stays two grouped GEMMs with one elementwise step between them.
Frozen weights are persistent buffers, so they are saved and moved with the module but no
optimizer ever sees them and autograd never computes their gradient. They are stored in
``frozen_dtype`` (quant.py: fp32, bf16, or int8/fp8 with per-output-channel scales in the
buffers ``w1_frozen_scale``, ``w2_frozen_scale``); ``frozen_weight`` widens them again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.moe import quant
from lifelong_moe.moe.banks import TwoBanks

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
EXPERT_INITS = ("random", "copy_most_used", "upcycle")


def glu(
    activation: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated form of ``activation`` on a [..., 2h] input holding [gate | up]."""

    def gated(a: torch.Tensor) -> torch.Tensor:
        gate, up = a.chunk(2, dim=-1)
        return activation(gate) * up

    return gated


def _uniform(n: int, fan_in: int, fan_out: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """[n, fan_in, fan_out] initialised like nn.Linear(fan_in, fan_out): U(+-1/sqrt(fan_in))."""
    kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(n, fan_in, fan_out, **kw).uniform_(-bound, bound)


class Experts(TwoBanks, nn.Module):
    """The expert weights; dispatch.py does the computation."""

    FROZEN, TRAINABLE = "w1_frozen", "w1"

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        n_experts: int,
        *,
        n_frozen: int = 0,
        gated: bool = False,
        frozen_dtype: str = "fp32",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.gated = bool(gated)
        self.frozen_dtype = quant.check_frozen_dtype("frozen_dtype", frozen_dtype)
        n_trainable = n_experts - n_frozen
        for name, w in (
            ("w1", self._new_w1(n_frozen)),
            ("w2", _uniform(n_frozen, d_hidden, d_model)),
        ):
            q, scale = quant.quantize(w, self.frozen_dtype)
            self.register_buffer(f"{name}_frozen", q)
            self.register_buffer(f"{name}_frozen_scale", scale)  # None: not in the state dict
        self.w1 = nn.Parameter(self._new_w1(n_trainable))
        self.w2 = nn.Parameter(_uniform(n_trainable, d_hidden, d_model))

    @property
    def w1_width(self) -> int:
        """Columns of w1: h, or 2h ([gate | up]) for gated experts."""
        return 2 * self.d_hidden if self.gated else self.d_hidden

    def _new_w1(self, n: int, like: torch.Tensor | None = None) -> torch.Tensor:
        return _uniform(n, self.d_model, self.w1_width, like=like)

    def frozen_weight(
        self, name: str, dtype: torch.dtype | None = None, experts: slice = slice(None)
    ) -> torch.Tensor:
        """Frozen bank ``name`` ("w1" or "w2"), rows `experts`, widened to `dtype` (default: the
        trainable bank's); a new tensor unless the bank is already stored in `dtype`."""
        q, scale = getattr(self, f"{name}_frozen"), getattr(self, f"{name}_frozen_scale")
        scale = None if scale is None else scale[experts]
        return quant.dequantize(q[experts], scale, self.w1.dtype if dtype is None else dtype)

    def frozen_bytes(self) -> int:
        """Bytes the frozen banks occupy as stored (scales included)."""
        return quant.stored_bytes(
            self.w1_frozen, self.w2_frozen, self.w1_frozen_scale, self.w2_frozen_scale
        )

    def weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w2) of one expert by its id; used by the loop reference and by expand()."""
        if expert < self.n_frozen:
            one = slice(expert, expert + 1)
            w1, w2 = (self.frozen_weight(name, experts=one)[0] for name in ("w1", "w2"))
            return w1, w2
        return self.w1[expert - self.n_frozen], self.w2[expert - self.n_frozen]

    @torch.no_grad()
    def expand(
        self,
        n_new: int,
        init: str = "random",
        noise_std: float = 0.01,
        usage: torch.Tensor | None = None,
    ) -> None:
        """Append n_new trainable experts.

        "random": fresh nn.Linear-scale weights. "copy_most_used": every new expert is a copy of
        the expert with the largest `usage` (ties -> lowest id) plus N(0, noise_std^2) noise, so
        new experts start from what already works but can diverge. "upcycle" (sparse upcycling,
        Komatsuzaki et al. 2023): new expert i copies the i-th most used expert (cycling when
        n_new exceeds the experts there are) and adds noise of noise_std times each weight
        tensor's own standard deviation, so pretrained experts of any scale are perturbed alike.
        """
        if init not in EXPERT_INITS:
            raise ConfigError(f"expand init={init!r}: expected one of {EXPERT_INITS}")
        like = self.w1
        if init == "copy_most_used":
            source = 0 if usage is None else int(torch.argmax(usage).item())
            w1_src, w2_src = self.weights(source)
            w1_new = w1_src.detach().unsqueeze(0).repeat(n_new, 1, 1)
            w2_new = w2_src.detach().unsqueeze(0).repeat(n_new, 1, 1)
            w1_new += torch.randn_like(w1_new) * noise_std
            w2_new += torch.randn_like(w2_new) * noise_std
        elif init == "upcycle" and self.n_experts:
            ranked = self._ranked(usage)
            sources = [ranked[i % len(ranked)] for i in range(n_new)]
            w1_new = torch.stack([self.weights(e)[0].detach() for e in sources]).clone()
            w2_new = torch.stack([self.weights(e)[1].detach() for e in sources]).clone()
            for w in (w1_new, w2_new):
                scale = w.flatten(1).std(dim=1).view(-1, 1, 1) * noise_std
                w += torch.randn_like(w) * scale
        else:
            w1_new = self._new_w1(n_new, like=like)
            w2_new = _uniform(n_new, self.d_hidden, self.d_model, like=like)
        self.w1 = nn.Parameter(torch.cat([self.w1.detach(), w1_new], dim=0))
        self.w2 = nn.Parameter(torch.cat([self.w2.detach(), w2_new], dim=0))

    def _ranked(self, usage: torch.Tensor | None) -> list[int]:
        """Expert ids by decreasing usage (ties -> lowest id); id order without usage."""
        if usage is None:
            return list(range(self.n_experts))
        order = sorted(range(self.n_experts), key=lambda e: (-float(usage[e]), e))
        return order

    @torch.no_grad()
    def freeze_existing(self) -> None:
        """Move every expert into the frozen bank, stored in ``frozen_dtype``; the trainable
        bank becomes empty. Experts frozen earlier keep their stored values (no requantizing)."""
        self.freeze_first(self.n_experts)

    @torch.no_grad()
    def freeze_first(self, n_frozen: int) -> None:
        """Move experts between the banks until exactly the first ``n_frozen`` are frozen (ids
        unchanged): trainable ones into the frozen bank, stored in ``frozen_dtype`` (a continued
        run restores an export's banks), or frozen ones back to trainable Parameters, widened
        to the trainable bank's dtype (a method that trains every expert, e.g. moe_finetune)."""
        move = n_frozen - self.n_frozen
        if not -self.n_frozen <= move <= self.n_trainable:
            raise ValueError(
                f"freeze_first({n_frozen}): {self.n_frozen} of {self.n_experts} frozen"
            )
        if move < 0:
            back = slice(n_frozen, None)
            for name in ("w1", "w2"):
                thawed = self.frozen_weight(name, experts=back)
                trainable = getattr(self, name).detach()
                setattr(self, name, nn.Parameter(torch.cat([thawed, trainable], dim=0)))
                scale = getattr(self, f"{name}_frozen_scale")
                setattr(self, f"{name}_frozen", getattr(self, f"{name}_frozen")[:n_frozen].clone())
                if scale is not None:
                    setattr(self, f"{name}_frozen_scale", scale[:n_frozen].clone())
            return
        for name in ("w1", "w2"):
            q, scale = quant.quantize(getattr(self, name).detach()[:move], self.frozen_dtype)
            old_q, old_scale = (
                getattr(self, f"{name}_frozen"),
                getattr(self, f"{name}_frozen_scale"),
            )
            setattr(self, f"{name}_frozen", torch.cat([old_q, q.to(old_q.device)], dim=0))
            if scale is not None:
                setattr(self, f"{name}_frozen_scale", torch.cat([old_scale, scale], dim=0))
        self.w1 = nn.Parameter(self.w1.detach()[move:].clone())
        self.w2 = nn.Parameter(self.w2.detach()[move:].clone())

    @torch.no_grad()
    def set_frozen_dtype(self, fmt: str) -> None:
        """Store the frozen banks in `fmt` from now on (what is frozen already is converted)."""
        fmt = quant.check_frozen_dtype("frozen_dtype", fmt)
        if fmt == self.frozen_dtype:
            return
        for name in ("w1", "w2"):
            q, scale = quant.quantize(self.frozen_weight(name, torch.float32), fmt)
            device = getattr(self, f"{name}_frozen").device
            setattr(self, f"{name}_frozen", q.to(device))
            # Assigning None to a registered buffer keeps it registered and out of the state dict.
            setattr(self, f"{name}_frozen_scale", None if scale is None else scale.to(device))
        self.frozen_dtype = fmt
