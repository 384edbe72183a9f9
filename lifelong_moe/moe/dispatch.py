"""Token dispatch: sort (token, slot) assignments by expert, grouped GEMMs, unsort, combine.

The grouped path has fixed shapes and never syncs with the host: counts and offsets come from
a searchsorted over the sorted expert keys (length E, on the device), there is no Python loop
over experts and no boolean-mask indexing, and the combine is a per-token weighted sum over a
[T, k, d] view (deterministic, unlike index_add_ on CUDA).

Frozen bank. grouped_mm groups start at row 0 of its left operand, so the bank whose weight
gradient we need must come first. Assignments are therefore sorted by a key that puts the
trainable experts first: key = (e - n_frozen) mod E. One grouped GEMM runs over all rows with
the weights [trainable; frozen] (a concat of the two banks), and the backward computes the
weight gradient only for the trainable prefix of the groups (offs[:n_trainable]): autograd never
spends a FLOP on frozen weight gradients, yet the forward is still one GEMM, one activation and
one gather. The concat costs one copy of the weights per call; it is skipped when a bank is
empty.

Stored frozen banks (bf16, int8, fp8; see quant.py) are dequantized straight into that concat,
per GEMM call, so they add no transient beyond the fp32 path's; the backward then rebuilds the
concat from the stored bank instead of keeping a full-precision copy alive between the passes.

`dispatch="loop"` (`loop_experts`) is the plain per-expert reference the tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lifelong_moe.moe import quant
from lifelong_moe.moe.experts import Experts

_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def capacity_for(
    capacity_factor: float | None, n_tokens: int, top_k: int, n_experts: int
) -> int | None:
    """Per-expert capacity ceil(cf * T * k / E) (None = dropless); host-side shapes only."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


class _GatherRows(torch.autograd.Function):
    """out[p] = x[index[p]], where index visits every row of x exactly `fan` times.

    Backward is a gather too (through `inverse`, with a reshape-sum over the `fan` copies), so
    it needs no scatter-add and is deterministic on every device.
    """

    @staticmethod
    def forward(ctx, x, index, inverse, fan):
        ctx.save_for_backward(inverse)
        ctx.fan = fan
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        if ctx.fan > 1:
            g = g.view(-1, ctx.fan, g.shape[-1]).sum(dim=1)
        return g, None, None, None


def _stored_as_is(w_frozen: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> bool:
    return scale is None and w_frozen.dtype == dtype


def _bank_weights(
    w_train: torch.Tensor, w_frozen: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """[w_train; w_frozen] in `dtype`, the frozen bank dequantized into its rows."""
    if w_frozen.shape[0] == 0:
        return w_train
    if _stored_as_is(w_frozen, scale, dtype):
        return w_frozen if w_train.shape[0] == 0 else torch.cat([w_train, w_frozen], dim=0)
    n_train = w_train.shape[0]
    w = w_train.new_empty((n_train + w_frozen.shape[0], *w_frozen.shape[1:]), dtype=dtype)
    w[:n_train].copy_(w_train)
    quant.dequantize_into(w[n_train:], w_frozen, scale)
    return w


def _zero_rows_past(t: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Rows >= end are left undefined by grouped_mm (uninitialised on CUDA): make them 0."""
    rows = torch.arange(t.shape[0], device=t.device).unsqueeze(1)
    return t.masked_fill(rows >= end, 0)


class _BankedGroupedMM(torch.autograd.Function):
    """grouped_mm(x, [w_train; w_frozen], offs) with a weight gradient for w_train only.

    w_frozen is the bank as stored, scale its per-channel scales (None: bf16/fp32).
    """

    @staticmethod
    def forward(ctx, x, w_train, w_frozen, scale, offs, zero_tail):
        dtype = w_train.dtype
        w = _bank_weights(w_train, w_frozen, scale, dtype)
        out = _grouped_mm(x, w, offs=offs)
        if zero_tail:
            out = _zero_rows_past(out, offs[-1])
        ctx.rebuild = not _stored_as_is(w_frozen, scale, dtype)
        if ctx.rebuild:  # keep the stored bank, not its widened copy, until the backward
            ctx.save_for_backward(x, w_train, w_frozen, scale, offs)
        else:
            ctx.save_for_backward(x, w, offs)
        ctx.dtype = dtype
        ctx.n_train = w_train.shape[0]
        ctx.zero_tail = zero_tail
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.rebuild:
            x, w_train, w_frozen, scale, offs = ctx.saved_tensors
            w = _bank_weights(w_train, w_frozen, scale, ctx.dtype)
        else:
            x, w, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _grouped_mm(grad, w.transpose(-2, -1), offs=offs)
            if ctx.zero_tail:
                grad_x = _zero_rows_past(grad_x, offs[-1])
        if ctx.needs_input_grad[1] and ctx.n_train > 0:
            # 2D x 2D form: groups split the contraction dim; only the trainable prefix is run.
            grad_w = _grouped_mm(x.t(), grad, offs=offs[: ctx.n_train])
        return grad_x, grad_w, None, None, None, None


def sort_assignments(
    expert_ids: torch.Tensor,
    valid: torch.Tensor | None,
    n_frozen: int,
    n_experts: int,
    capacity: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order flat assignments by bank key; returns (perm, offs int32 [E], counts [E] in id order,
    dropped).

    Assignments that go nowhere (invalid slots, capacity overflow) get the sentinel key E and
    sort past offs[-1], where grouped_mm ignores them.
    """
    e = expert_ids.reshape(-1)
    n_train = n_experts - n_frozen
    key = e
    if n_frozen and n_train:
        key = torch.where(e >= n_frozen, e - n_frozen, e + n_train)
    if valid is not None:
        key = key.masked_fill(~valid.reshape(-1), n_experts)
    sorted_key, perm = torch.sort(key, stable=True)
    bounds = torch.arange(n_experts + 1, device=e.device)
    dropped = torch.zeros((), dtype=torch.long, device=e.device)
    if capacity is not None:
        starts = torch.searchsorted(sorted_key, bounds)  # first row of each key (E = sentinel)
        position = torch.arange(e.numel(), device=e.device) - starts[sorted_key]
        overflow = (position >= capacity) & (sorted_key < n_experts)
        dropped = overflow.sum()
        sorted_key, again = torch.sort(sorted_key.masked_fill(overflow, n_experts), stable=True)
        perm = perm[again]
    offs = torch.searchsorted(sorted_key, bounds[1:], out_int32=True)
    counts_by_key = torch.diff(offs, prepend=offs.new_zeros(1)).long()
    counts = counts_by_key
    if n_frozen and n_train:
        counts = torch.cat([counts_by_key[n_train:], counts_by_key[:n_train]])
    return perm, offs, counts, dropped


def grouped_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    gates: torch.Tensor,
    valid: torch.Tensor | None,
    experts: Experts,
    activation: Callable[[torch.Tensor], torch.Tensor],
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y [T, d] = sum_s gates[:, s] * expert_{ids[:, s]}(x); returns (y, counts [E], dropped)."""
    n_tokens, top_k = expert_ids.shape
    n = n_tokens * top_k
    perm, offs, counts, dropped = sort_assignments(
        expert_ids, valid, experts.n_frozen, experts.n_experts, capacity
    )
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(n, device=perm.device))
    zero_tail = valid is not None or capacity is not None
    w1, w2 = experts.w1, experts.w2
    if torch.is_autocast_enabled(x.device.type):
        # Custom Functions bypass autocast: cast here so bf16-mixed training takes the bf16
        # grouped_mm path (gradients flow back to the fp32 master weights through .to()); the
        # frozen banks are dequantized to w1's dtype inside _BankedGroupedMM.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w2 = (t.to(dtype) for t in (x, w1, w2))
    xs = _GatherRows.apply(x, perm // top_k, inverse, top_k)
    h = _BankedGroupedMM.apply(xs, w1, experts.w1_frozen, experts.w1_frozen_scale, offs, zero_tail)
    h = activation(h)
    ys = _BankedGroupedMM.apply(h, w2, experts.w2_frozen, experts.w2_frozen_scale, offs, zero_tail)
    y = _GatherRows.apply(ys, inverse, perm, 1)
    return combine(y, gates), counts, dropped


def combine(y_flat: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum over the k slots of each token, as a reshape-sum in the model dtype.

    (A [T, 1, k] @ [T, k, d] bmm is 2x faster on CPU but made an H100 step 40% slower; an fp32
    upcast costs an extra pass over y: both measured, see results/dispatch_cpu.md.)
    """
    n_tokens, top_k = gates.shape
    y = y_flat.view(n_tokens, top_k, y_flat.shape[-1]) * gates.to(y_flat.dtype).unsqueeze(-1)
    return y.sum(dim=1)


def loop_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    gates: torch.Tensor,
    valid: torch.Tensor | None,
    experts: Experts,
    activation: Callable[[torch.Tensor], torch.Tensor],
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert reference: obviously correct, syncs with the host, slow for large E."""
    n_tokens, top_k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    if valid is not None:
        flat = flat.masked_fill(~valid.reshape(-1), -1)
    y = x.new_zeros(n_tokens * top_k, x.shape[-1])
    counts = torch.zeros(experts.n_experts, dtype=torch.long, device=x.device)
    dropped = torch.zeros((), dtype=torch.long, device=x.device)
    for e in range(experts.n_experts):
        rows = (flat == e).nonzero().squeeze(1)  # (token, slot) order = arrival order
        if capacity is not None and rows.numel() > capacity:
            dropped = dropped + (rows.numel() - capacity)
            rows = rows[:capacity]
        counts[e] = rows.numel()
        if rows.numel() == 0:
            continue
        w1, w2 = experts.weights(e)
        y = y.index_put((rows,), activation(x[rows // top_k] @ w1) @ w2)
    return combine(y, gates), counts, dropped
