"""Streams on sklearn's 1,797 real 8x8 digits: built in, so they run anywhere in seconds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lifelong_moe.data.arrays import (
    Arrays,
    check_class_order,
    check_count,
    check_n_experiences,
    check_split,
    class_incremental,
    domain_incremental,
    standardize,
    stratified_split,
)
from lifelong_moe.stream import Stream

N_CLASSES = 10


def load_digits_split(
    seed: int, test_fraction: float, validation_fraction: float = 0.0, split: str = "test"
) -> Arrays:
    """Seeded stratified split of the digits as (1, 8, 8) images, standardised on train.

    ``validation_fraction`` > 0 carves a stratified validation set out of the training part
    (seeded, so fixed per seed); it is never trained on. ``split`` says which held-out set the
    returned "test" arrays are: ``test`` (what studies report) or ``validation`` (what settings
    are chosen on). The training arrays are the same either way.
    """
    from sklearn.datasets import load_digits

    validation_fraction = check_split(split, validation_fraction)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_tr, y_tr, x_te, y_te = stratified_split(x, y, test_fraction, seed, "digits")
    if validation_fraction:
        x_tr, y_tr, x_va, y_va = stratified_split(
            x_tr, y_tr, validation_fraction, seed, "digits", key="validation_fraction"
        )
        if split == "validation":
            x_te, y_te = x_va, y_va
    x_tr, x_te = standardize(x_tr, x_te)
    return x_tr, y_tr, x_te, y_te


def split_digits(
    n_experiences: int = 5,
    seed: int = 0,
    fixed_class_order: Sequence[int] | None = None,
    test_fraction: float = 0.3,
    task_labels: bool = False,
    validation_fraction: float = 0.0,
    split: str = "test",
) -> Stream:
    """Class-incremental digits: ``10 / n_experiences`` new classes per experience."""
    check_n_experiences(n_experiences, N_CLASSES)
    order = check_class_order(fixed_class_order, N_CLASSES)
    return class_incremental(
        "split_digits",
        load_digits_split(seed, test_fraction, validation_fraction, split),
        n_experiences=n_experiences,
        seed=seed,
        class_order=order,
        task_labels=bool(task_labels),
        n_classes=N_CLASSES,
    )


def pixel_permutations(n_experiences: int, n_pixels: int, seed: int) -> list[torch.Tensor]:
    """The permutations Avalanche's PermutedMNIST draws: every experience, the first included,
    takes the next ``RandomState(seed).permutation`` (no identity experience)."""
    rng = np.random.RandomState(seed)
    return [torch.from_numpy(rng.permutation(n_pixels)) for _ in range(n_experiences)]


def permuted_digits(
    n_experiences: int = 5,
    seed: int = 0,
    test_fraction: float = 0.3,
    task_labels: bool = False,
    validation_fraction: float = 0.0,
    split: str = "test",
) -> Stream:
    """Domain-incremental digits: one fixed pixel permutation per experience, labels 0..9."""
    check_count(n_experiences)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed, test_fraction, validation_fraction, split)
    parts = []
    for perm in pixel_permutations(n_experiences, x_tr[0].numel(), seed):
        parts.append(
            (
                x_tr.flatten(1)[:, perm].view_as(x_tr),
                y_tr,
                x_te.flatten(1)[:, perm].view_as(x_te),
                y_te,
            )
        )
    return domain_incremental(
        "permuted_digits", parts, task_labels=bool(task_labels), n_classes=N_CLASSES
    )
