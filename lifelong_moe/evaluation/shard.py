"""Evaluation split over the processes of a DDP run: each takes a shard, the sums are reduced.

Rank r of w evaluates test examples r, r + w, r + 2w, ... (no padding: every example is
counted once), and the counts and loss sums are all-reduced, so every rank gets the row that
one process computes over the whole set (equal up to the order of the float sums; accuracy
counts are integers and equal exactly). Without a process group this is one shard of one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset


def _group() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_loader(data: Dataset, batch_size: int) -> DataLoader:
    """This process's share of ``data``, in order, in batches of ``batch_size``."""
    rank, world = _group()
    if world == 1:
        return DataLoader(data, batch_size=batch_size)
    return DataLoader(data, batch_size=batch_size, sampler=range(rank, len(data), world))


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every process (in place; itself when there is one process)."""
    if _group()[1] > 1:
        dist.all_reduce(tensor)
    return tensor
