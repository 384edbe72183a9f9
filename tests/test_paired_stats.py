"""Paired confidence intervals on constructed examples (values worked out by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lifelong_moe.evaluation.stats import paired_differences, paired_interval


def test_paired_t_interval_by_hand():
    # differences by seed: 0.1, 0.2, 0.3, 0.2 -> mean 0.2, sd sqrt(0.02/3), n 4
    reference = {0: 0.5, 1: 0.6, 2: 0.4, 3: 0.7}
    method = {0: 0.6, 1: 0.8, 2: 0.7, 3: 0.9}
    ci = paired_interval(method, reference)
    half = 3.182446305284263 * math.sqrt(0.02 / 3) / 2  # t_{0.975, 3} = 3.1824...
    assert ci.n == 4 and ci.mean == pytest.approx(0.2)
    assert (ci.low, ci.high) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert ci.excludes_zero
    # the same as scipy's one-sample t interval on the differences
    low, high = stats.ttest_1samp([0.1, 0.2, 0.3, 0.2], 0).confidence_interval(0.95)
    assert (ci.low, ci.high) == (pytest.approx(low), pytest.approx(high))


def test_pairing_removes_the_seed_effect_that_an_unpaired_comparison_keeps():
    # Seeds differ a lot (0.3 .. 0.9); the method is better by exactly 0.01 on every seed.
    reference = {s: 0.3 + 0.15 * s for s in range(5)}
    method = {s: v + 0.01 for s, v in reference.items()}
    ci = paired_interval(method, reference)
    assert ci.mean == pytest.approx(0.01)
    assert ci.high - ci.low == pytest.approx(0.0, abs=1e-12)  # no spread in the differences
    assert ci.excludes_zero


def test_only_seeds_both_methods_ran_are_paired():
    d = paired_differences({0: 1.0, 1: 2.0, 5: 9.0}, {0: 0.5, 1: 1.0, 2: 7.0})
    assert d.tolist() == [0.5, 1.0]
    assert paired_differences({0: float("nan"), 1: 2.0}, {0: 0.5, 1: 1.0}).tolist() == [1.0]


def test_one_pair_has_no_interval_and_noise_gives_an_interval_across_zero():
    one = paired_interval({0: 0.7}, {0: 0.5})
    assert one.n == 1 and one.mean == pytest.approx(0.2)
    assert math.isnan(one.low) and math.isnan(one.high) and not one.excludes_zero
    noisy = paired_interval({0: 0.6, 1: 0.4, 2: 0.55}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert noisy.low < 0 < noisy.high and not noisy.excludes_zero


def test_bootstrap_interval_is_reproducible_and_within_the_range_of_differences():
    rng = np.random.default_rng(1)
    reference = {s: float(v) for s, v in enumerate(rng.normal(0.5, 0.1, 8))}
    method = {s: v + 0.05 + float(rng.normal(0, 0.01)) for s, v in reference.items()}
    a = paired_interval(method, reference, kind="bootstrap")
    b = paired_interval(method, reference, kind="bootstrap")
    assert a == b
    d = paired_differences(method, reference)
    assert d.min() <= a.low < a.mean < a.high <= d.max()
    with pytest.raises(ValueError, match="kind="):
        paired_interval(method, reference, kind="wald")
