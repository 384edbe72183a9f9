"""Fused dispatch (``dispatch="fused"``): Triton kernels that never materialise the gathered
input copy nor the [k*T, d] expert output.

Layout. Assignments (token t, slot s) are sorted by group g = s * E + key, key being the bank key
of dispatch.py (trainable experts first, frozen last), so each (slot, expert) group is one
contiguous run of sorted rows and each bank one contiguous range of keys. A block table built
on the device (no host sync; its length is a static bound, ceil(T/BM) + E per slot) tells every
program its expert and its rows.

Forward, two kernels:
  1. gather-GEMM: z[p] = x[tok[p]] @ W1[e]  (rows read through the sorted index), with the
     activation in its epilogue: a = act(z); z is kept for the backward.
  2. scatter-GEMM, launched once per slot: y[tok[p]] += gate[p] * (a[p] @ W2[e]). Within one
     slot every token occurs at most once, so the k launches accumulate in a fixed order without
     atomics: the combine is deterministic and there is no [k*T, d] intermediate.
Backward: dA = gate * dy[tok] @ W2^T with the gate gradient (a . dA/gate, reduced per h-block
and summed in torch) and act' in the epilogue; dx by the per-slot scatter-GEMM through W1^T;
weight gradients for the trainable bank only (one program per trainable expert and tile, a loop
over its rows in all k slots: deterministic); the frozen bank gets none and costs nothing.

The op is a torch.library custom op with a fake (meta) implementation and a registered
autograd formula, so torch.compile(fullgraph=True) traces through it without a graph break.
Triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before triton is
imported (the tests do so on small shapes).
"""

from __future__ import annotations

import os

import torch

from lifelong_moe.errors import ConfigError

try:  # triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

# What dispatch="auto" picks on CUDA. False: on an H200 the kernels were slower than grouped_mm
# at every measured shape, most of it in the backward's row kernel (results/dispatch_h200.md,
# results/h200_session/profile_fused.txt); flip it only when a new measurement says otherwise.
FUSED_BY_DEFAULT = False
ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}
# tl.dot needs every block dimension >= 16, hence d and h multiples of 16.
ALIGN = 16


def available() -> bool:
    """Triton importable (CUDA tensors), or its interpreter on (CPU tensors)."""
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device: torch.device) -> bool:
    """Whether the fused kernels can run on tensors of this device."""
    return available() and (device.type == "cuda" or interpreting())


GATED_REFUSAL = (
    "dispatch='fused' with gated experts: the Triton kernels implement act(x W1) W2 only; "
    "use dispatch='grouped' (or 'auto')"
)


def check_shapes(d_model: int, d_hidden: int, activation: str, gated: bool = False) -> None:
    if gated:
        raise ConfigError(GATED_REFUSAL)
    for name, value in (("d_model", d_model), ("d_hidden", d_hidden)):
        if value % ALIGN:
            raise ConfigError(
                f"{name}={value}: expected a multiple of {ALIGN} for dispatch='fused' "
                "(Triton tile size); use dispatch='grouped' otherwise"
            )
    if activation not in ACT_CODES:
        raise ConfigError(f"activation={activation!r}: fused dispatch supports {tuple(ACT_CODES)}")


def _blocks(device: torch.device) -> tuple[int, int, int]:
    """(BM, BN, BK): large tiles on a GPU, the smallest legal ones for the interpreter."""
    if device.type == "cuda":
        return 64, 64, 32
    return 16, 32, 16


if triton is not None:

    @triton.jit
    def _sigmoid(u):
        return 1.0 / (1.0 + tl.exp(-u))

    @triton.jit
    def _act(z, ACT: tl.constexpr):
        if ACT == 0:
            return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        elif ACT == 1:
            u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            return 0.5 * z * (2.0 * _sigmoid(2.0 * u))
        elif ACT == 2:
            return tl.maximum(z, 0.0)
        else:
            return z * _sigmoid(z)

    @triton.jit
    def _act_grad(z, ACT: tl.constexpr):
        if ACT == 0:
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
        elif ACT == 1:
            u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            t = 2.0 * _sigmoid(2.0 * u) - 1.0
            du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
            return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
        elif ACT == 2:
            return (z > 0.0).to(tl.float32)
        else:
            sg = _sigmoid(z)
            return sg * (1.0 + z * (1.0 - sg))

    @triton.jit
    def _rows_kernel(
        x_ptr,  # [*, K] input rows (gathered through tok when GATHER)
        wt_ptr,  # trainable bank [n_train, ...]
        wf_ptr,  # frozen bank [n_frozen, ...]
        n_train,
        tok_ptr,  # int32 [N]: token of each sorted row
        table_ptr,  # int32 [n_blocks, 3]: key, first row, end row (key < 0: no work)
        scale_ptr,  # fp32 [N] gate of each sorted row
        out_ptr,  # [*, N_out] rows p, or tok[p] when SCATTER
        aux_ptr,  # EPI 1: a = act(z) out; EPI 2: a in
        z_ptr,  # EPI 2: pre-activation z in
        dgate_ptr,  # EPI 2: fp32 [N, n_tiles_n] partial gate gradients
        K,
        N_out,
        stride_x,
        stride_we,
        stride_wk,
        stride_wn,
        stride_o,
        n_tiles_n,
        GATHER: tl.constexpr,
        SCATTER: tl.constexpr,
        SCALE: tl.constexpr,
        EPI: tl.constexpr,  # 0: plain, 1: activation, 2: gate grad + activation grad
        ACT: tl.constexpr,
        IEEE: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_n = tl.program_id(1)
        key = tl.load(table_ptr + pid * 3)
        if key >= 0:
            row0 = tl.load(table_ptr + pid * 3 + 1)
            row1 = tl.load(table_ptr + pid * 3 + 2)
            rows = row0 + tl.arange(0, BM)
            rmask = rows < row1
            if GATHER or SCATTER:
                toks = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
            if GATHER:  # noqa: SIM108 (a branch on a constexpr, compiled away)
                src = toks
            else:
                src = rows.to(tl.int64)
            if key < n_train:
                w_base = wt_ptr + key.to(tl.int64) * stride_we
            else:
                w_base = wf_ptr + (key - n_train).to(tl.int64) * stride_we
            cols = pid_n * BN + tl.arange(0, BN)
            cmask = cols < N_out
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < K
                xt = tl.load(
                    x_ptr + src[:, None] * stride_x + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :],
                    other=0.0,
                )
                wt = tl.load(
                    w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=kmask[:, None] & cmask[None, :],
                    other=0.0,
                )
                if IEEE:
                    acc += tl.dot(xt, wt, input_precision="ieee")
                else:
                    acc += tl.dot(xt, wt)
            omask = rmask[:, None] & cmask[None, :]
            if SCALE:
                g = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
            if EPI == 1:
                o_off = rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
                tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=omask)
                a = _act(acc, ACT)
                tl.store(aux_ptr + o_off, a.to(aux_ptr.dtype.element_ty), mask=omask)
            elif EPI == 2:
                o_off = rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
                a = tl.load(aux_ptr + o_off, mask=omask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + o_off, mask=omask, other=0.0).to(tl.float32)
                part = tl.sum(acc * a, axis=1)
                tl.store(dgate_ptr + rows.to(tl.int64) * n_tiles_n + pid_n, part, mask=rmask)
                dz = acc * g[:, None] * _act_grad(z, ACT)
                tl.store(out_ptr + o_off, dz.to(out_ptr.dtype.element_ty), mask=omask)
            else:
                if SCALE:
                    acc = acc * g[:, None]
                if SCATTER:
                    o_off = toks[:, None] * stride_o + cols[None, :]
                    prev = tl.load(out_ptr + o_off, mask=omask, other=0.0)
                    tl.store(out_ptr + o_off, prev + acc, mask=omask)
                else:
                    o_off = rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
                    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _weight_grad_kernel(
        l_ptr,  # [*, KL] left rows (gathered when GATHER_L)
        r_ptr,  # [*, NR] right rows (gathered when GATHER_R)
        tok_ptr,
        scale_ptr,
        start_ptr,  # int32 [k, E] first sorted row of each (slot, key) group
        end_ptr,  # int32 [k, E]
        out_ptr,  # fp32 [n_train, KL, NR]
        n_keys,
        top_k,
        KL,
        NR,
        stride_l,
        stride_r,
        GATHER_L: tl.constexpr,
        GATHER_R: tl.constexpr,
        SCALE: tl.constexpr,
        IEEE: tl.constexpr,
        BM: tl.constexpr,
        BKL: tl.constexpr,
        BN: tl.constexpr,
    ):
        e = tl.program_id(0)
        ks = tl.program_id(1) * BKL + tl.arange(0, BKL)
        cs = tl.program_id(2) * BN + tl.arange(0, BN)
        kmask = ks < KL
        cmask = cs < NR
        acc = tl.zeros((BKL, BN), dtype=tl.float32)
        for s in range(0, top_k):
            row0 = tl.load(start_ptr + s * n_keys + e)
            row1 = tl.load(end_ptr + s * n_keys + e)
            for r0 in range(row0, row1, BM):
                rows = r0 + tl.arange(0, BM)
                rmask = rows < row1
                toks = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
                if GATHER_L:  # noqa: SIM108 (a branch on a constexpr, compiled away)
                    lsrc = toks
                else:
                    lsrc = rows.to(tl.int64)
                if GATHER_R:  # noqa: SIM108 (a branch on a constexpr, compiled away)
                    rsrc = toks
                else:
                    rsrc = rows.to(tl.int64)
                lt = tl.load(
                    l_ptr + lsrc[:, None] * stride_l + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :],
                    other=0.0,
                )
                rt = tl.load(
                    r_ptr + rsrc[:, None] * stride_r + cs[None, :],
                    mask=rmask[:, None] & cmask[None, :],
                    other=0.0,
                )
                if SCALE:
                    g = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
                    rt = (rt.to(tl.float32) * g[:, None]).to(rt.dtype)
                if IEEE:
                    acc += tl.dot(tl.trans(lt), rt, input_precision="ieee")
                else:
                    acc += tl.dot(tl.trans(lt), rt)
        o_off = e.to(tl.int64) * KL * NR + ks[:, None] * NR + cs[None, :]
        tl.store(out_ptr + o_off, acc, mask=kmask[:, None] & cmask[None, :])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows(
    x: torch.Tensor,
    w_train: torch.Tensor,
    w_frozen: torch.Tensor,
    transpose_w: bool,
    tok: torch.Tensor,
    table: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
    *,
    gather: bool,
    scatter: bool,
    use_scale: bool,
    epi: int,
    act: int,
    aux: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dgate: torch.Tensor | None = None,
) -> None:
    """Launch _rows_kernel over the blocks of `table`: out rows = x rows @ W[key] (+ epilogue)."""
    bm, bn, bk = _blocks(x.device)
    w = w_train if w_train.shape[0] else w_frozen
    # W[e] is [K, N] as stored, or its transpose (swap the strides, no copy).
    if transpose_w:
        k_dim, n_dim, s_k, s_n = w.shape[2], w.shape[1], w.stride(2), w.stride(1)
    else:
        k_dim, n_dim, s_k, s_n = w.shape[1], w.shape[2], w.stride(1), w.stride(2)
    n_tiles = _cdiv(n_dim, bn)
    dummy = scale
    _rows_kernel[(table.shape[0], n_tiles)](
        x,
        w_train if w_train.shape[0] else w,
        w_frozen if w_frozen.shape[0] else w,
        w_train.shape[0],
        tok,
        table,
        scale,
        out,
        aux if aux is not None else dummy,
        z if z is not None else dummy,
        dgate if dgate is not None else dummy,
        k_dim,
        n_dim,
        x.stride(0),
        w.stride(0),
        s_k,
        s_n,
        out.stride(0),
        n_tiles,
        GATHER=gather,
        SCATTER=scatter,
        SCALE=use_scale,
        EPI=epi,
        ACT=act,
        IEEE=x.dtype == torch.float32,
        BM=bm,
        BN=bn,
        BK=bk,
    )


def _weight_grad(
    left: torch.Tensor,
    right: torch.Tensor,
    tok: torch.Tensor,
    scale: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    n_train: int,
    *,
    gather_left: bool,
    gather_right: bool,
    use_scale: bool,
) -> torch.Tensor:
    """fp32 [n_train, KL, NR] = per trainable key, sum over its rows of left^T @ right."""
    kl, nr = left.shape[1], right.shape[1]
    out = torch.empty(n_train, kl, nr, device=left.device, dtype=torch.float32)
    bm, bn, _ = _blocks(left.device)
    bkl = bn
    grid = (n_train, _cdiv(kl, bkl), _cdiv(nr, bn))
    _weight_grad_kernel[grid](
        left,
        right,
        tok,
        scale,
        starts,
        ends,
        out,
        starts.shape[1],
        starts.shape[0],
        kl,
        nr,
        left.stride(0),
        right.stride(0),
        GATHER_L=gather_left,
        GATHER_R=gather_right,
        SCALE=use_scale,
        IEEE=left.dtype == torch.float32,
        BM=bm,
        BKL=bkl,
        BN=bn,
    )
    return out


# ----------------------------------------------------------------------------- the custom op


@torch.library.custom_op("lifelong_moe::fused_moe", mutates_args=())
def fused_moe(
    x: torch.Tensor,
    w1: torch.Tensor,
    w1_frozen: torch.Tensor,
    w2: torch.Tensor,
    w2_frozen: torch.Tensor,
    gate: torch.Tensor,
    tok: torch.Tensor,
    table: torch.Tensor,
    bounds: torch.Tensor,
    top_k: int,
    act: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [T, d], z [N, h], a [N, h]); table [k, B, 3] per slot, bounds [2, k, E] (see plan)."""
    n_rows, d_hidden = tok.shape[0], w1.shape[2]
    z = torch.empty(n_rows, d_hidden, device=x.device, dtype=x.dtype)
    a = torch.empty_like(z)
    flat = table.reshape(-1, 3)
    _rows(x, w1, w1_frozen, False, tok, flat, gate, z, gather=True, scatter=False,
          use_scale=False, epi=1, act=act, aux=a)  # fmt: skip
    y = torch.zeros(x.shape[0], x.shape[1], device=x.device, dtype=torch.float32)
    for s in range(top_k):
        _rows(a, w2, w2_frozen, False, tok, table[s], gate, y, gather=False, scatter=True,
              use_scale=True, epi=0, act=act)  # fmt: skip
    return y.to(x.dtype), z, a


@fused_moe.register_fake
def _(x, w1, w1_frozen, w2, w2_frozen, gate, tok, table, bounds, top_k, act):
    z = x.new_empty(tok.shape[0], w1.shape[2])
    return torch.empty_like(x), z, torch.empty_like(z)


@torch.library.custom_op("lifelong_moe::fused_moe_backward", mutates_args=())
def fused_moe_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w1_frozen: torch.Tensor,
    w2: torch.Tensor,
    w2_frozen: torch.Tensor,
    gate: torch.Tensor,
    tok: torch.Tensor,
    table: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    z: torch.Tensor,
    a: torch.Tensor,
    top_k: int,
    act: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1 [trainable only], dw2 [trainable only], dgate [N] in sorted order)."""
    dy = dy.contiguous()
    bn = _blocks(x.device)[1]
    n_rows, d_hidden = z.shape
    n_tiles = _cdiv(d_hidden, bn)
    dgate_part = torch.zeros(n_rows, n_tiles, device=x.device, dtype=torch.float32)
    dz = torch.empty_like(z)
    flat = table.reshape(-1, 3)
    _rows(dy, w2, w2_frozen, True, tok, flat, gate, dz, gather=True, scatter=False,
          use_scale=True, epi=2, act=act, aux=a, z=z, dgate=dgate_part)  # fmt: skip
    dx = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    for s in range(top_k):
        _rows(dz, w1, w1_frozen, True, tok, table[s], gate, dx, gather=False, scatter=True,
              use_scale=False, epi=0, act=act)  # fmt: skip
    n_train = w1.shape[0]
    if n_train:
        dw1 = _weight_grad(x, dz, tok, gate, starts, ends, n_train, gather_left=True,
                           gather_right=False, use_scale=False).to(w1.dtype)  # fmt: skip
        dw2 = _weight_grad(a, dy, tok, gate, starts, ends, n_train, gather_left=False,
                           gather_right=True, use_scale=True).to(w2.dtype)  # fmt: skip
    else:
        dw1, dw2 = torch.zeros_like(w1), torch.zeros_like(w2)
    return dx.to(x.dtype), dw1, dw2, dgate_part.sum(dim=1)


@fused_moe_backward.register_fake
def _(dy, x, w1, w1_frozen, w2, w2_frozen, gate, tok, table, starts, ends, z, a, top_k, act):
    return (
        torch.empty_like(x),
        torch.empty_like(w1),
        torch.empty_like(w2),
        gate.new_empty(gate.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, w1, w1_frozen, w2, w2_frozen, gate, tok, table, bounds, top_k, act = inputs
    _, z, a = output
    ctx.save_for_backward(x, w1, w1_frozen, w2, w2_frozen, gate, tok, table, bounds, z, a)
    ctx.top_k, ctx.act = top_k, act


def _backward(ctx, dy, dz_unused, da_unused):
    x, w1, w1_frozen, w2, w2_frozen, gate, tok, table, bounds, z, a = ctx.saved_tensors
    dx, dw1, dw2, dgate = fused_moe_backward(
        dy, x, w1, w1_frozen, w2, w2_frozen, gate, tok, table, bounds[0], bounds[1], z, a,
        ctx.top_k, ctx.act,
    )  # fmt: skip
    return dx, dw1, None, dw2, None, dgate, None, None, None, None, None


fused_moe.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- plan + entry


def plan(
    expert_ids: torch.Tensor,
    valid: torch.Tensor | None,
    n_frozen: int,
    n_experts: int,
    capacity: int | None,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, slot) assignments by (slot, bank key) and tile each group into row blocks.

    Returns (perm, tok int32 [N], table int32 [k, B, 3], bounds int32 [2, k, E], counts [E] in id
    order, dropped). All on the device, fixed shapes, no host sync: B = ceil(T / BM) + E bounds
    the blocks of one slot; unused entries have key -1. Capacity keeps the first `capacity`
    assignments of each expert in token-major order, as the grouped path does.
    """
    n_tokens, top_k = expert_ids.shape
    device = expert_ids.device
    e = expert_ids.reshape(-1).long()
    n_train = n_experts - n_frozen
    key = e
    if n_frozen and n_train:
        key = torch.where(e >= n_frozen, e - n_frozen, e + n_train)
    keep = torch.ones_like(e, dtype=torch.bool) if valid is None else valid.reshape(-1)
    dropped = torch.zeros((), dtype=torch.long, device=device)
    if capacity is not None:
        sorted_key, order = torch.sort(key.masked_fill(~keep, n_experts), stable=True)
        first = torch.searchsorted(sorted_key, torch.arange(n_experts + 1, device=device))
        position = torch.arange(e.numel(), device=device) - first[sorted_key]
        overflow = (position >= capacity) & (sorted_key < n_experts)
        dropped = overflow.sum()
        keep = keep & ~torch.empty_like(overflow).scatter_(0, order, overflow)
    slot = torch.arange(top_k, device=device).repeat(n_tokens)
    group = (slot * n_experts + key).masked_fill(~keep, top_k * n_experts)
    sorted_group, perm = torch.sort(group, stable=True)
    tok = (perm // top_k).to(torch.int32)
    n_groups = torch.arange(top_k * n_experts, device=device)
    starts = torch.searchsorted(sorted_group, n_groups).view(top_k, n_experts)
    ends = torch.searchsorted(sorted_group, n_groups, right=True).view(top_k, n_experts)
    count = ends - starts
    counts = count.sum(0)
    if n_frozen and n_train:
        counts = torch.cat([counts[n_train:], counts[:n_train]])
    blocks = (count + block_m - 1) // block_m
    cum = blocks.cumsum(1)
    n_blocks = -(-n_tokens // block_m) + n_experts
    b = torch.arange(n_blocks, device=device).expand(top_k, n_blocks).contiguous()
    k_of = torch.searchsorted(cum, b, right=True)
    used = k_of < n_experts
    kc = k_of.clamp_max(n_experts - 1)
    first_block = cum.gather(1, kc) - blocks.gather(1, kc)
    row0 = starts.gather(1, kc) + (b - first_block) * block_m
    row1 = ends.gather(1, kc)
    table = torch.stack([kc.masked_fill(~used, -1), row0, row1], dim=-1).to(torch.int32)
    bounds = torch.stack([starts, ends]).to(torch.int32)
    return perm, tok, table.contiguous(), bounds, counts, dropped


def fused_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    gates: torch.Tensor,
    valid: torch.Tensor | None,
    experts,
    activation: str,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y [T, d] = sum_s gates[:, s] * expert_{ids[:, s]}(x), fused; returns (y, counts, dropped).

    Same contract as dispatch.grouped_experts; `activation` is the name (see ACT_CODES).
    """
    top_k = expert_ids.shape[1]
    perm, tok, table, bounds, counts, dropped = plan(
        expert_ids, valid, experts.n_frozen, experts.n_experts, capacity, _blocks(x.device)[0]
    )
    # A stored (bf16/int8/fp8) frozen bank is widened here, a transient copy per call.
    w1_frozen, w2_frozen = experts.frozen_weight("w1"), experts.frozen_weight("w2")
    w1, w2 = experts.w1, experts.w2
    if torch.is_autocast_enabled(x.device.type):
        # Custom ops bypass autocast: cast here (gradients reach the fp32 weights through .to()).
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w1_frozen, w2, w2_frozen = (t.to(dtype) for t in (x, w1, w1_frozen, w2, w2_frozen))
    else:
        w1_frozen, w2_frozen = w1_frozen.to(x.dtype), w2_frozen.to(x.dtype)
        w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
    gate = gates.reshape(-1).float()[perm]
    y, _, _ = fused_moe(
        x.contiguous(), w1, w1_frozen, w2, w2_frozen, gate, tok, table, bounds, top_k,
        ACT_CODES[activation],
    )  # fmt: skip
    return y, counts, dropped
