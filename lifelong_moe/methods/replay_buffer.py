"""The replay buffer: a class-balanced reservoir of past samples, seeded and resumable.

Any method replays when ``replay_buffer_size > 0`` (see ``ContinualMethod``): its training set
becomes ``ConcatDataset([current experience, buffer])``, shuffled together by the runner's
loader, and the buffer takes in the experience's training data after it has been evaluated.

The buffer is our own rather than Avalanche's ``ClassBalancedBuffer``: that one is updated from
a strategy object, stores ``AvalancheDataset`` subsets and draws from torch's global RNG, none
of which fits a method that sees plain tensor datasets and must be seeded and resumable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset


def dataset_labels(data: Dataset) -> torch.Tensor:
    """Labels of a ``(x, y, t)`` dataset; tensor datasets answer without reading inputs."""
    if isinstance(data, TensorDataset):
        return data.tensors[1]
    return torch.as_tensor([int(data[i][1]) for i in range(len(data))], dtype=torch.int64)


def dataset_items(data: Dataset, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(x, y, t)`` of the items at ``index``, stacked."""
    if isinstance(data, TensorDataset):
        return tuple(t[index] for t in data.tensors[:3])
    items = [data[i] for i in index.tolist()] or [data[0]]  # item 0 only gives empty shapes
    stacked = (torch.stack([torch.as_tensor(item[k]) for item in items]) for k in range(3))
    return tuple(part[: len(index)] for part in stacked)


def balanced_quotas(counts: list[int], capacity: int) -> list[int]:
    """Split ``capacity`` evenly over classes; a class with fewer samples than its share
    leaves the rest to the others (water-filling), so the buffer fills whenever it can."""
    quotas = [0] * len(counts)
    left = capacity
    order = sorted(range(len(counts)), key=lambda c: (counts[c], c))
    for rank, c in enumerate(order):
        quotas[c] = min(counts[c], left // (len(counts) - rank))
        left -= quotas[c]
    return quotas


class ReplayBuffer:
    """Class-balanced reservoir sampling with a seeded generator.

    Every sample ever offered gets a uniform random key; each class keeps the samples with
    the largest keys, up to its quota. Keeping the top keys of a class is a uniform random
    sample of everything that class has offered, in any order of arrival (reservoir sampling,
    as in Avalanche's ReservoirSamplingBuffer), and quotas only shrink as classes appear, so
    a discarded sample is never needed again. Sequence targets (language modelling) have no
    class: they form one group, a plain reservoir.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.t: torch.Tensor | None = None
        self.groups = torch.zeros(0, dtype=torch.int64)
        self.keys = torch.zeros(0)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, data: Dataset) -> None:
        """Offer every sample of ``data`` to the buffer."""
        y_new = dataset_labels(data)
        if len(y_new) == 0:
            return
        groups_new = y_new.long() if y_new.dim() == 1 else torch.zeros(len(y_new), dtype=torch.long)
        keys_new = torch.rand(len(y_new), generator=self.generator)
        n_old = len(self)
        all_groups = torch.cat([self.groups, groups_new])
        all_keys = torch.cat([self.keys, keys_new])
        members = [torch.nonzero(all_groups == g).flatten() for g in all_groups.unique()]
        quotas = balanced_quotas([len(m) for m in members], self.capacity)
        kept = []
        for index, quota in zip(members, quotas, strict=True):
            order = torch.sort(all_keys[index], descending=True, stable=True).indices
            kept.append(index[order[:quota]])
        keep = torch.cat(kept).sort().values
        old, new = keep[keep < n_old], keep[keep >= n_old] - n_old
        fresh = [part.detach().cpu() for part in dataset_items(data, new)]
        if self.x is None:
            self.x, self.y, self.t = fresh
        else:
            kept_old = (self.x[old], self.y[old], self.t[old])
            self.x, self.y, self.t = (torch.cat(p) for p in zip(kept_old, fresh, strict=True))
        self.groups, self.keys = all_groups[keep], all_keys[keep]

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.x, self.y, self.t)

    def class_counts(self) -> dict[int, int]:
        classes, counts = self.groups.unique(return_counts=True)
        return dict(zip(classes.tolist(), counts.tolist(), strict=True))

    # What the resume state holds as it is (beside the generator's state).
    STATE = ("capacity", "x", "y", "t", "groups", "keys")

    def state_dict(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in self.STATE}
        return {**state, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.STATE:
            setattr(self, name, state[name])
        self.generator.set_state(state["generator"])
