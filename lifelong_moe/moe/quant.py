"""Weight-only storage formats for frozen expert banks: fp32, bf16, int8, fp8 (e4m3).

Frozen experts never change again, so they can be stored in fewer bytes and widened again
inside the dispatch. A bank is a stacked weight [E, d_in, d_out] (``w1`` or ``w2`` of
experts.py, gated or not); int8 and fp8 keep one fp32 scale per expert and output channel,
[E, 1, d_out], so a stored bank costs E * d_in * d_out bytes + 4 * E * d_out bytes of scales,
(0.25 + 1/d_in)x of fp32's.

    int8: q = round(w / s), s = max_in |w| / 127; |w - q s| <= s / 2
    fp8:  q = e4m3(w / s),  s = max_in |w| / 448; relative error <= 2^-4 (3 mantissa bits)
    bf16: w rounded to bf16 (no scale);           relative error <= 2^-8

``dequantize`` is the one place a stored bank becomes a compute-dtype tensor again; the dispatch
calls it per grouped GEMM and the loop reference per expert, so both see the same numbers.
"""

from __future__ import annotations

import torch

from lifelong_moe.errors import ConfigError

FROZEN_DTYPES = ("fp32", "bf16", "int8", "fp8")
INT8_MAX = 127.0


def fp8_supported() -> bool:
    """torch has float8 e4m3 and can convert to and from it on the CPU."""
    if not hasattr(torch, "float8_e4m3fn"):
        return False
    try:
        probe = torch.tensor([1.5, -2.0]).to(torch.float8_e4m3fn).float()
    except (RuntimeError, TypeError):
        return False
    return bool(torch.equal(probe, torch.tensor([1.5, -2.0])))


def check_frozen_dtype(key: str, value: object) -> str:
    """A valid format name; one-line ConfigError otherwise (fp8 on a torch without float8)."""
    if value not in FROZEN_DTYPES:
        raise ConfigError(f"{key}={value!r}: expected one of {FROZEN_DTYPES}")
    if value == "fp8" and not fp8_supported():
        raise ConfigError(
            f"{key}=fp8: this torch {torch.__version__} has no usable float8_e4m3fn; "
            "expected fp32, bf16 or int8"
        )
    return str(value)


def storage_dtype(fmt: str) -> torch.dtype:
    """The dtype a bank of this format is stored in."""
    return {
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "int8": torch.int8,
        "fp8": getattr(torch, "float8_e4m3fn", torch.float32),
    }[fmt]


def has_scale(fmt: str) -> bool:
    return fmt in ("int8", "fp8")


def _max_code(fmt: str) -> float:
    return INT8_MAX if fmt == "int8" else torch.finfo(torch.float8_e4m3fn).max


@torch.no_grad()
def quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stacked weight [E, d_in, d_out] -> (stored tensor, fp32 scales [E, 1, d_out] or None)."""
    if not has_scale(fmt):
        return w.detach().to(storage_dtype(fmt)), None
    w = w.detach().float()
    code = _max_code(fmt)
    scale = w.abs().amax(dim=1, keepdim=True) / code
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel
    scaled = (w / scale).clamp(-code, code)
    if fmt == "int8":
        return scaled.round().to(torch.int8), scale
    return scaled.to(storage_dtype(fmt)), scale


def dequantize_into(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Write the stored bank into `out` (any float dtype): q is widened exactly (int8 and e4m3
    codes fit bf16), then multiplied by the fp32 scale in fp32 and rounded once to out's dtype.
    No fp32 temporary of the bank: the dispatch writes straight into its concat buffer."""
    out.copy_(q)
    if scale is not None:
        out.mul_(scale)
    return out


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The stored bank as a new `dtype` tensor (the same numbers as ``dequantize_into``)."""
    if scale is None and q.dtype == dtype:
        return q
    return dequantize_into(torch.empty(q.shape, dtype=dtype, device=q.device), q, scale)


def error_bound(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per-element bound on |w - dequantize(quantize(w))| for this format (tests use it)."""
    w = w.float()
    if fmt == "fp32":
        return torch.zeros_like(w)
    if fmt == "bf16":
        return w.abs() * 2.0**-8
    scale = w.abs().amax(dim=1, keepdim=True) / _max_code(fmt)
    if fmt == "int8":
        return (scale / 2).expand_as(w) * (1 + 1e-6)
    # e4m3: 3 mantissa bits -> half an ulp is 2^-4 relative; subnormals (below 2^-6) have a
    # fixed step of 2^-9, so half of it in absolute terms.
    return torch.maximum(w.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 1e-6)


def stored_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes these tensors occupy (None counts 0): weights and scales of frozen banks."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
