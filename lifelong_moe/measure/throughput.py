"""Training throughput per experience: tokens per second and model FLOP utilisation (MFU).

Tokens are the target positions trained on: every byte of a language-model window, one per
sample for a classifier. Model FLOPs per token follow PaLM (Chowdhery et al. 2022, app. B):
6 x active parameters (forward + backward) plus 12 x n_attention_layers x d_model x sequence
length for the attention scores. The teacher's forward (Lifelong-MoE's distillation) is part of
the time but not of the FLOPs, so MFU measures useful student work. The peak comes from a small
table of known devices; on any other device (every CPU) there is no MFU, only tokens/s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lifelong_moe import names
from lifelong_moe.models import count_parameters

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets, by device name substring.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 80GB HBM3": {"bf16": 989e12, "fp32": 67e12},  # H100 SXM
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp32": 60e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}


def precision_kind(precision: str | int) -> str:
    """Lightning precision -> the peak column: half precisions use the tensor-core peak."""
    return "bf16" if any(p in str(precision) for p in ("bf16", "16")) else "fp32"


def peak_flops(device_name: str, precision: str | int) -> float | None:
    """Peak FLOP/s of one device of this name, or None where the table does not know it."""
    for key, peaks in PEAK_FLOPS.items():
        if key in device_name:
            return peaks[precision_kind(precision)]
    return None


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def tokens_per_sample(data: Any) -> int:
    """Target positions per training sample (the label's element count)."""
    return max(1, torch.as_tensor(data[0][1]).numel())


def flops_per_token(model: nn.Module, sequence_length: int) -> float:
    """6 x active parameters + 12 x attention layers x d_model x sequence length."""
    active = count_parameters(model)["active"]
    attention = sum(
        m.embed_dim for m in model.modules() if isinstance(m, nn.MultiheadAttention)
    )  # sum over layers of d_model
    return 6.0 * active + 12.0 * attention * sequence_length


def throughput_metrics(
    model: nn.Module,
    data: Any,
    epochs: float,
    seconds: float,
    device: torch.device,
    precision: str | int,
    n_devices: int = 1,
) -> dict[str, float]:
    """``cost/tokens_per_s`` always; ``cost/mfu`` where the device's peak is known."""
    per_sample = tokens_per_sample(data)
    tokens = len(data) * epochs * per_sample
    rate = tokens / seconds if seconds > 0 else 0.0
    out = {names.COST_TOKENS_PER_S: rate}
    peak = peak_flops(device_label(device), precision)
    if peak is not None:
        sequence = per_sample if per_sample > 1 else 1
        out[names.COST_MFU] = rate * flops_per_token(model, sequence) / (peak * n_devices)
    return out
