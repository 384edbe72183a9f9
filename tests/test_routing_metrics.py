"""Routing metrics on hand-made shares (values worked out by hand in the comments)."""

from __future__ import annotations

import math

import pytest

from lifelong_moe.evaluation.routing import (
    drift,
    max_imbalance,
    routing_metrics,
    specialization,
    total_variation,
)


def test_specialization_perfect_chance_and_partial():
    origin = [0, 0, 1, 1]
    perfect = [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7]]
    assert specialization(perfect, origin, 1) == pytest.approx(1.0)
    uniform = [[0.25] * 4, [0.25] * 4]
    assert specialization(uniform, origin, 1) == pytest.approx(0.5)  # (0.5 + 0.5) / 2
    # exp 0 keeps 0.9 on its experts, exp 1 sends only 0.2 to its own: (0.9 + 0.2) / 2
    partial = [[0.4, 0.5, 0.1, 0.0], [0.5, 0.3, 0.2, 0.0]]
    assert specialization(partial, origin, 1) == pytest.approx(0.55)
    # at t = 0 only experience 0 counts, even if later rows exist (future experiences)
    assert specialization(partial, origin, 0) == pytest.approx(0.9)


def test_specialization_of_a_moe_that_does_not_grow_is_one_over_t_plus_one():
    origin = [0, 0, 0]
    shares = [[0.2, 0.3, 0.5]] * 4
    for t in range(4):
        assert specialization(shares, origin, t) == pytest.approx(1 / (t + 1))


def test_shares_taken_before_growth_are_a_prefix_of_the_expert_ids():
    # After experience 0 only 2 experts existed; their row is shorter than origin.
    assert specialization([[0.6, 0.4]], [0, 0, 1, 1], 0) == pytest.approx(1.0)


def test_total_variation_pads_missing_experts_with_zero():
    assert total_variation([0.5, 0.5], [0.5, 0.5, 0.0]) == 0.0
    assert total_variation([0.5, 0.5], [0.0, 0.0, 1.0]) == pytest.approx(1.0)
    assert total_variation([0.5, 0.5], [0.25, 0.25, 0.5]) == pytest.approx(0.5)


def test_drift_compares_each_earlier_experience_with_itself_right_after_it():
    history = [
        [[1.0, 0.0], [0.5, 0.5]],  # after exp 0 (2 experts); the exp 1 row is not used
        [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]],  # after exp 1: exp 0 moved half its mass
        [[0.5, 0.0, 0.5], [0.0, 0.5, 0.5]],  # after exp 2
    ]
    assert math.isnan(drift(history, 0))
    assert drift(history, 1) == pytest.approx(0.5)  # TV([1,0], [.5,.5,0])
    # j=0: TV([1,0], [.5,0,.5]) = 0.5; j=1: TV([0,0,1], [0,.5,.5]) = 0.5
    assert drift(history, 2) == pytest.approx(0.5)
    unchanged = [[[1.0, 0.0]], [[1.0, 0.0, 0.0]]]
    assert drift(unchanged, 1) == 0.0


def test_max_imbalance_is_the_largest_mean_share_over_seen_experiences():
    shares = [[0.5, 0.5, 0.0, 0.0], [0.0, 0.1, 0.4, 0.5], [1.0, 0.0, 0.0, 0.0]]
    assert max_imbalance(shares, 0) == pytest.approx(0.5)
    assert max_imbalance(shares, 1) == pytest.approx(0.3)  # means 0.25, 0.3, 0.2, 0.25
    assert max_imbalance([[0.25] * 4], 0) == pytest.approx(0.25)  # balanced: 1/E


def test_routing_metrics_name_every_layer_and_their_mean():
    origin = [0, 0, 1, 1]
    layer0 = [[1.0, 0.0], [0.5, 0.5]]
    history = [
        [layer0, layer0],
        [
            [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]],  # layer 0: specialised, no drift
            [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 0.0, 0.0]],  # layer 1: exactly the wrong way
        ],
    ]
    first = routing_metrics(history, origin, 0)
    assert "routing/drift" not in first
    assert first["routing/specialization"] == 1.0
    out = routing_metrics(history, origin, 1)
    assert out["routing/specialization/layer_0"] == pytest.approx(1.0)
    assert out["routing/specialization/layer_1"] == pytest.approx(0.0)
    assert out["routing/specialization"] == pytest.approx(0.5)
    assert out["routing/drift/layer_0"] == pytest.approx(0.5)  # TV([1,0], [.5,.5,0,0])
    assert out["routing/drift/layer_1"] == pytest.approx(1.0)
    assert out["routing/drift"] == pytest.approx(0.75)
    assert out["routing/max_imbalance/layer_0"] == pytest.approx(0.25)
    assert set(out) == {
        f"routing/{m}{suffix}"
        for m in ("specialization", "drift", "max_imbalance")
        for suffix in ("", "/layer_0", "/layer_1")
    }
