"""Train, validation and test on the digits benchmarks: disjoint, fixed by seed, same training
data whichever held-out set is evaluated (issue 24)."""

from __future__ import annotations

import pytest
import torch

from lifelong_moe.data.digits import load_digits_split, permuted_digits, split_digits
from lifelong_moe.errors import ConfigError


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


def test_validation_is_carved_from_train_disjoint_and_fixed_by_seed():
    x_tr0, y_tr0, x_te0, _ = load_digits_split(0, 0.3)
    x_tr, y_tr, x_te, y_te = load_digits_split(0, 0.3, validation_fraction=0.2)
    x_tr2, y_tr2, x_va, y_va = load_digits_split(
        0, 0.3, validation_fraction=0.2, split="validation"
    )
    # training arrays are identical whether test or validation is evaluated
    assert torch.equal(x_tr, x_tr2) and torch.equal(y_tr, y_tr2)
    # sizes: 30 % test of 1,797; 20 % of the rest held out
    assert len(x_te) == len(x_te0) and len(x_tr) + len(x_va) == len(x_tr0)
    assert len(x_va) == pytest.approx(0.2 * len(x_tr0), abs=1)
    # disjoint from the training part (both standardised with the same training statistics)
    assert len(x_va) > 0 and not (rows(x_va) & rows(x_tr2))
    # fixed by seed, another seed another split
    again = load_digits_split(0, 0.3, 0.2, "validation")
    assert torch.equal(again[2], x_va) and torch.equal(again[3], y_va)
    other = load_digits_split(1, 0.3, 0.2, "validation")
    assert not torch.equal(other[3], y_va)
    # stratified: every class in the validation set
    assert set(y_va.tolist()) == set(range(10))


def test_streams_evaluate_on_the_chosen_split():
    test = split_digits(seed=0, validation_fraction=0.2)
    valid = split_digits(seed=0, validation_fraction=0.2, split="validation")
    for a, b in zip(test.experiences, valid.experiences, strict=True):
        assert torch.equal(a.train.tensors[0], b.train.tensors[0])
        assert len(a.test) != len(b.test)
    perm_test = permuted_digits(seed=0, validation_fraction=0.2)
    perm_valid = permuted_digits(seed=0, validation_fraction=0.2, split="validation")
    assert torch.equal(
        perm_test.experiences[0].train.tensors[0], perm_valid.experiences[0].train.tensors[0]
    )
    assert sum(len(e.test) for e in valid.experiences) == len(perm_valid.experiences[0].test)
    with pytest.raises(ConfigError, match="validation_fraction > 0"):
        split_digits(split="validation")
    with pytest.raises(ConfigError, match="benchmark.split"):
        split_digits(split="train")
