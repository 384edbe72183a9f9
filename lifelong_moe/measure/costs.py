"""What one experience cost: parameters, wall time, checkpoints, throughput, peak memory.

The ``cost/*`` row the runner logs beside the quality metrics of the same experience.
"""

from __future__ import annotations

import resource
from typing import Any

import torch
from torch import nn

from lifelong_moe import names
from lifelong_moe.measure.throughput import throughput_metrics
from lifelong_moe.models import count_parameters, moe_layers


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA allocator memory, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cost_row(
    model: nn.Module,
    data: Any,
    *,
    epochs: float,
    train_s: float,
    eval_s: float,
    checkpoints: dict[str, float],
    device: torch.device,
    precision: str | int,
    n_devices: int,
) -> dict[str, float]:
    """The ``cost/*`` metrics of one experience.

    ``checkpoints`` holds the ``cost/checkpoint_*`` metrics (``checkpointing.fit_costs``):
    ``cost/checkpoint_s`` (what training waited for) is part of ``train_s``,
    ``cost/checkpoint_write_s`` ran in a background thread, beside training.
    """
    params = count_parameters(model)
    row = {names.cost_params(k): v for k, v in params.items()}
    row[names.COST_TRAIN_S] = train_s
    row |= checkpoints
    row[names.COST_EVAL_S] = eval_s
    row |= throughput_metrics(model, data, epochs, train_s, device, precision, n_devices)
    row[names.COST_PEAK_MB] = peak_memory_mb(device)
    row[names.COST_FROZEN_BYTES] = float(
        sum(layer.experts.frozen_bytes() for layer in moe_layers(model).values())
    )
    return row
