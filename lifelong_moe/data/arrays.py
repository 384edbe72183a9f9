"""Streams from in-memory arrays (digits, npz files, image folders) via Avalanche's generators.

Arrays are split, normalised and wrapped in plain ``TensorDataset``s here; ``nc_benchmark``
then makes the experiences, exactly as Avalanche's own SplitMNIST/PermutedMNIST do, so an
Avalanche strategy can run on ``Stream.avalanche`` and see the same tensors as our runner.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lifelong_moe import checks
from lifelong_moe.data.materialize import materialize
from lifelong_moe.errors import ConfigError
from lifelong_moe.stream import Stream

Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(x_train, y_train, x_test, y_test)``."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_count(n_experiences: int, key: str = "n_experiences") -> int:
    """Streams with one experience per domain take any positive count."""
    return checks.positive_int(f"benchmark.{key}", n_experiences)


def check_n_experiences(n_experiences: int, n_classes: int, key: str = "n_experiences") -> int:
    """Class-incremental streams split the classes evenly, as Avalanche's ``nc_benchmark`` does."""
    checks.integer(f"benchmark.{key}", n_experiences)
    valid = divisors(n_classes)
    if n_experiences not in valid:
        if n_experiences > n_classes:
            why = f"there are only {n_classes} classes"
        else:
            why = f"it does not divide the {n_classes} classes"
        choices = ", ".join(map(str, valid))
        raise ConfigError(
            f"benchmark.{key}={n_experiences} is invalid: {why}; valid choices: {choices}"
        )
    return n_experiences


def check_class_order(
    order: Sequence[int] | None, n_classes: int, key: str = "fixed_class_order"
) -> list[int] | None:
    """A fixed class order must name every class exactly once (Avalanche would accept subsets)."""
    if order is None:
        return None
    try:
        values = [int(c) for c in order]
    except (TypeError, ValueError):
        raise ConfigError(
            f"benchmark.{key}={order!r}: expected a list of class ids 0..{n_classes - 1}"
        ) from None
    if sorted(values) != list(range(n_classes)):
        raise ConfigError(
            f"benchmark.{key}={values} is not a permutation of the classes 0..{n_classes - 1}"
        )
    return values


def check_fraction(fraction: float, key: str = "test_fraction") -> float:
    """A share of the examples strictly between 0 and 1: both halves must hold something."""
    return float(
        checks.number(f"benchmark.{key}", fraction, low=0, high=1, low_open=True, high_open=True)
    )


SPLITS = ("test", "validation")
"""``benchmark.split``: which held-out set ``Experience.test`` holds. ``test`` is what studies
report; ``validation`` (carved out of the training part, never trained on) is what settings are
chosen on."""


def check_split(
    split: str,
    validation_fraction: float,
    key: str = "validation_fraction",
    held_from: str = "the training part",
) -> float:
    """Check ``benchmark.split`` and the validation share (``benchmark.<key>``, taken from
    ``held_from``) together; the fraction (0: no validation set) is returned as a float."""
    checks.choice("benchmark.split", split, SPLITS)
    fraction = float(
        checks.number(f"benchmark.{key}", validation_fraction, low=0, high=1, high_open=True)
    )
    if split == "validation" and not fraction:
        raise ConfigError(
            f"benchmark.split=validation needs benchmark.{key} > 0 (the share of "
            f"{held_from} held out for validation), got 0"
        )
    return fraction


def held_out_size(fraction: float, n: int) -> int:
    """Items a held-out part of ``n`` takes at ``fraction``: at least one when > 0, none at 0."""
    return max(1, round(fraction * n)) if fraction > 0 else 0


def seeded_parts(n: int, sizes: dict[str, int], seed: int, index: int) -> dict[str, np.ndarray]:
    """Sorted indices of the parts of ``n`` items (``index``: which item set, e.g. a domain): a
    permutation seeded by ``[seed, index]`` is cut into ``sizes`` in their order, and ``train``
    is the rest. The same seed gives the same parts on every machine."""
    order = np.random.default_rng([seed, index]).permutation(n)
    parts = np.split(order, np.cumsum(list(sizes.values())))
    return {name: np.sort(part) for name, part in zip([*sizes, "train"], parts, strict=True)}


def stratified_split(
    x: torch.Tensor,
    y: torch.Tensor,
    test_fraction: float,
    seed: int,
    where: str,
    names: Sequence | None = None,
    key: str = "test_fraction",
) -> Arrays:
    """Seeded split that keeps each class's share in both halves (sklearn's stratify).

    ``names[c]`` is how the user knows class ``c`` (its original label), for messages; ``key``
    is the benchmark key that set ``test_fraction`` (``validation_fraction`` for a validation
    set carved out of the training part).
    """
    from sklearn.model_selection import train_test_split

    test_fraction = check_fraction(test_fraction, key)
    labels, counts = np.unique(y.numpy(), return_counts=True)
    if counts.min() < 2:
        rare = int(labels[counts.argmin()])
        rare = names[rare] if names is not None else rare
        raise ConfigError(
            f"{where}: class {rare} has {counts.min()} example; a stratified train/test split "
            "needs at least 2 per class (or give x_test/y_test)"
        )
    index = np.arange(len(y))
    try:
        train_idx, test_idx = train_test_split(
            index, test_size=test_fraction, random_state=seed, stratify=y.numpy()
        )
    except ValueError as err:
        raise ConfigError(f"{where}: benchmark.{key}={test_fraction}: {err}") from None
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def standardize(
    x_train: torch.Tensor, *others: torch.Tensor, channel_axis: int | None = None
) -> list[torch.Tensor]:
    """Zero mean, unit variance with statistics of the training inputs only (no test leakage).

    ``channel_axis=None`` uses one scalar mean/std, which is right for any array layout;
    image folders pass ``channel_axis=1`` for per-channel statistics.
    """
    if channel_axis is None:
        mean, std = x_train.mean(), x_train.std()
    else:
        dims = [d for d in range(x_train.dim()) if d != channel_axis]
        mean = x_train.mean(dim=dims, keepdim=True)[0]
        std = x_train.std(dim=dims, keepdim=True)[0]
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [((x - mean) / std).float() for x in (x_train, *others)]


def class_incremental(
    name: str,
    arrays: Arrays,
    *,
    n_experiences: int,
    seed: int,
    class_order: list[int] | None,
    task_labels: bool,
    n_classes: int,
) -> Stream:
    """Classes split evenly over experiences in a seeded (or fixed) order, as SplitMNIST does."""
    from avalanche.benchmarks import nc_benchmark

    x_tr, y_tr, x_te, y_te = arrays
    # Avalanche seeds torch's global RNG to shuffle the classes: keep that out of the caller.
    with torch.random.fork_rng(devices=[]):
        benchmark = nc_benchmark(
            TensorDataset(x_tr, y_tr),
            TensorDataset(x_te, y_te),
            n_experiences=n_experiences,
            task_labels=task_labels,
            shuffle=True,
            seed=seed,
            fixed_class_order=class_order,
        )
    return materialize(
        benchmark,
        name=name,
        scenario="class_incremental",
        n_classes=n_classes,
        task_labels=task_labels,
    )


def domain_incremental(
    name: str, parts: Sequence[Arrays], *, task_labels: bool, n_classes: int
) -> Stream:
    """One experience per dataset, one shared label space (Avalanche's PermutedMNIST recipe).

    ``class_ids_from_zero_in_each_exp=True`` undoes ``nc_benchmark``'s per-dataset label offset;
    it maps each experience's classes to 0..k-1 in sorted order, which keeps the labels only if
    every experience has every class: callers check that and say which input lacks one.
    """
    from avalanche.benchmarks import nc_benchmark

    for i, (_, y_tr, _, _) in enumerate(parts):
        present = torch.unique(y_tr).tolist()
        if present != list(range(n_classes)):
            raise RuntimeError(f"{name} experience {i} lacks classes: caller must check")
    benchmark = nc_benchmark(
        [TensorDataset(x_tr, y_tr) for x_tr, y_tr, _, _ in parts],
        [TensorDataset(x_te, y_te) for _, _, x_te, y_te in parts],
        n_experiences=len(parts),
        task_labels=task_labels,
        shuffle=False,
        one_dataset_per_exp=True,
        class_ids_from_zero_in_each_exp=True,
    )
    return materialize(
        benchmark,
        name=name,
        scenario="domain_incremental",
        n_classes=n_classes,
        task_labels=task_labels,
    )
