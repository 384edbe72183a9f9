"""Turn an Avalanche benchmark into the runner's :class:`Stream`.

Every builder ends here, so the tensors we train on are read out of the very Avalanche datasets
an Avalanche strategy would iterate: the two can only disagree if this module is wrong, and it
checks the labels it reads.

Experiences are read once into ``TensorDataset(x float32, y int64, t int64)`` (``in_memory``):
in float32 an MNIST image takes 3 KB and a CIFAR image 12 KB, so all of MNIST needs 220 MB and
all of CIFAR 740 MB; a PermutedMNIST experience repeats the 220 MB. Larger sets (TinyImageNet
at 64x64 would take ~5 GB, CORe50 more) stay lazy: a thin view converts each Avalanche item to
the same triple on access. Reading costs ~40 us per MNIST item, ~150 us with a rotation.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lifelong_moe.stream import Experience, Stream


class TripleView(Dataset):
    """Lazy stand-in for a materialised experience: yields ``(x float32, y int64, t int64)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, t = self.dataset[index][:3]
        return (
            torch.as_tensor(x, dtype=torch.float32),
            torch.as_tensor(y, dtype=torch.int64),
            torch.as_tensor(t, dtype=torch.int64),
        )


def read_tensors(dataset: Any, batch_size: int = 1024) -> TensorDataset:
    """Read every ``(x, y, t)`` item of an Avalanche dataset, in order, into one TensorDataset."""
    collate = getattr(dataset, "collate_fn", None)
    # Own generator: iterating a DataLoader otherwise draws a seed from torch's global RNG.
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate, generator=torch.Generator()
    )
    xs, ys, ts = [], [], []
    for batch in loader:
        x, y, t = batch[:3]
        xs.append(torch.as_tensor(x, dtype=torch.float32))
        ys.append(torch.as_tensor(y, dtype=torch.int64))
        ts.append(torch.as_tensor(t, dtype=torch.int64))
    return TensorDataset(torch.cat(xs), torch.cat(ys), torch.cat(ts))


def _targets(dataset: Any) -> torch.Tensor:
    """Labels without touching inputs (Avalanche datasets keep them as a data attribute)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    return torch.as_tensor(list(dataset.targets), dtype=torch.int64)


def _check_labels(data: Any, classes: Sequence[int], n_classes: int, where: str) -> None:
    """Guard against silent label remapping (e.g. ``class_ids_from_zero_in_each_exp`` misuse)."""
    y = _targets(data)
    if len(y) == 0:
        raise RuntimeError(f"{where} is empty")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise RuntimeError(f"{where} has labels outside 0..{n_classes - 1}: bug in the builder")
    extra = set(y.unique().tolist()) - set(classes)
    if extra:
        raise RuntimeError(f"{where} has labels {sorted(extra)} not in its classes {classes}")


def _class_subset(dataset: Any, classes: Sequence[int]) -> Any:
    """The items of a shared test set whose label is in ``classes``."""
    mask = torch.isin(_targets(dataset), torch.as_tensor(list(classes)))
    return dataset.subset(torch.nonzero(mask).flatten().tolist())


def materialize(
    benchmark: Any,
    *,
    name: str,
    scenario: str,
    n_classes: int,
    task_labels: bool,
    in_memory: bool = True,
    shared_test: str | None = None,
    split: str = "test",
    batch_size: int = 1024,
) -> Stream:
    """Build the runner's Stream from an Avalanche benchmark, reading each experience once.

    ``n_classes`` is passed in because Avalanche's own count is wrong for one-dataset-per-
    experience benchmarks (PermutedMNIST reports 10 x n_experiences). ``shared_test`` handles
    benchmarks with a single test experience (CORe50): ``"all"`` gives every experience the
    whole test set, ``"by_class"`` the part of it with that experience's classes.
    ``split="validation"`` reads ``Experience.test`` from the benchmark's ``valid_stream``
    (:mod:`lifelong_moe.data.validation`) instead of its ``test_stream``; with a shared test set
    the experiences' validation parts are pooled into one shared validation set, served the
    same way.
    """
    train_stream = list(benchmark.train_stream)
    held_stream = benchmark.valid_stream if split == "validation" else benchmark.test_stream
    held = [exp.dataset for exp in held_stream]
    if split == "validation" and shared_test is not None:
        held = [reduce(lambda a, b: a.concat(b), held)]
    if shared_test is None and len(held) != len(train_stream):
        raise RuntimeError(f"{name}: {len(train_stream)} train but {len(held)} {split} experiences")
    read = read_tensors if in_memory else TripleView
    shared = None
    if shared_test == "all":
        shared = read(held[0])

    experiences = []
    for i, exp in enumerate(train_stream):
        classes = sorted(int(c) for c in exp.classes_in_this_experience)
        train = read(exp.dataset)
        if shared_test is None:
            test = read(held[i])
        elif shared_test == "by_class":
            test = read(_class_subset(held[0], classes))
        else:
            test = shared
        test_classes = range(n_classes) if shared_test == "all" else classes
        for part, data, allowed in (("train", train, classes), ("test", test, test_classes)):
            source = data.dataset if isinstance(data, TripleView) else data
            _check_labels(source, allowed, n_classes, f"{name} experience {i} {part}")
        task = exp.task_label if task_labels else 0
        experiences.append(Experience(i, train, test, classes, int(task)))

    x0 = experiences[0].train[0][0]
    return Stream(
        name=name,
        experiences=experiences,
        n_classes=n_classes,
        input_shape=tuple(x0.shape),
        scenario=scenario,
        task_labels=task_labels,
        avalanche=benchmark,
    )
