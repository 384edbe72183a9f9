"""Evaluation split over the processes of a DDP run: each takes a shard, the sums are reduced.

Rank r of w evaluates test examples r, r + w, r + 2w, ... (every example is counted once), and
the counts and loss sums are all-reduced, so every rank gets the row that one process computes
over the whole set (equal up to the order of the float sums; accuracy counts are integers and
equal exactly). Without a process group this is one shard of one.

Every rank runs the same number of forward passes: a layer sharded over ranks (expert
parallelism) exchanges tokens with a collective in every forward, so a rank whose shard has
one batch fewer would leave the others waiting. Such a rank ends with empty batches (zero rows
of the right shape): they run the model, collectives included, and count nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, default_collate


def _group() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_loader(data: Dataset, batch_size: int) -> Iterator[Any] | DataLoader:
    """This process's share of ``data``, in order, in batches of ``batch_size``; as many
    batches on every rank (see the module's docstring)."""
    rank, world = _group()
    if world == 1:
        return DataLoader(data, batch_size=batch_size)
    return shard_batches(data, batch_size, rank, world)


def shard_batches(data: Dataset, batch_size: int, rank: int, world: int) -> Iterator[Any]:
    """Rank ``rank``'s batches of ``data``, then empty batches up to the fullest rank's count."""
    loader = DataLoader(data, batch_size=batch_size, sampler=range(rank, len(data), world))
    longest = math.ceil(math.ceil(len(data) / world) / batch_size)
    yield from loader
    missing = longest - len(loader)
    if missing > 0:
        empty = _empty_batch(data)
        for _ in range(missing):
            yield empty


def _empty_batch(data: Dataset) -> Any:
    """A batch of zero rows shaped like ``data``'s."""
    one = default_collate([data[0]])  # a list of tensors for the (x, y[, t]) examples here
    return [t[:0] if torch.is_tensor(t) else t for t in one]


def gather_from_ranks(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (``[obj]`` when there is one process)."""
    world = _group()[1]
    if world == 1:
        return [obj]
    found: list[Any] = [None] * world
    dist.all_gather_object(found, obj)
    return found


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every process (in place; itself when there is one process)."""
    if _group()[1] > 1:
        dist.all_reduce(tensor)
    return tensor
