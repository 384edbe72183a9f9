"""Routing metrics on hand-made shares (values worked out by hand in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from lifelong_moe.evaluation.routing import (
    TOPK_SUBSET,
    add_batch,
    changed_share,
    drift,
    new_stats,
    routing_imbalance,
    routing_metrics,
    specialization,
    specialization_corrected,
    token_change,
    token_drift,
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
    # Without per-token statistics (runs recorded before issue 24) only these two are known;
    # the pooled routing/max_imbalance of those runs is not logged under any name any more.
    assert set(out) == {
        f"routing/{m}{suffix}"
        for m in ("specialization", "drift")
        for suffix in ("", "/layer_0", "/layer_1")
    }


# --- per-token statistics (issue 24) ----------------------------------------------------------

ALL = None  # every expert reachable


def stats_of(ids, valid=None, reachable=ALL, n_experts=4):
    stats = new_stats(n_experts)
    add_batch(
        stats,
        torch.tensor(ids),
        None if valid is None else torch.tensor(valid),
        None if reachable is None else torch.tensor(reachable),
    )
    return stats


def test_statistics_count_each_token_once_per_expert_and_chance_over_reachable_experts():
    # k = 2 of 4 experts, nothing masked: chance puts each expert in 3 * 2 / 4 of 3 tokens' sets.
    s = stats_of([[0, 1], [1, 0], [2, 1]])
    assert s["tokens"] == 3
    assert s["counts"] == [2, 3, 1, 0]
    assert s["expected"] == pytest.approx([1.5] * 4)
    assert s["topk"] == [[0, 1], [0, 1], [1, 2]]  # sorted sets
    # Per-token reachable sets: token 0 sees {0, 1} (both certain), token 1 all four (1/2 each),
    # token 2 only {3}: one real slot (its second slot is not valid), expert 3 certain.
    reach = [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]]
    s = stats_of(
        [[0, 1], [2, 3], [3, 0]],
        valid=[[True, True], [True, True], [True, False]],
        reachable=[[bool(v) for v in row] for row in reach],
    )
    assert s["counts"] == [1, 1, 1, 2]
    assert s["expected"] == pytest.approx([1.5, 1.5, 0.5, 1.5])
    assert s["topk"] == [[0, 1], [2, 3], [-1, 3]]


def test_topk_sets_are_kept_for_a_fixed_subset_only():
    stats = new_stats(4)
    for _ in range(3):
        add_batch(stats, torch.tensor([[0, 1]] * 200), None, None)
    assert stats["tokens"] == 600
    assert len(stats["topk"]) == TOPK_SUBSET


def test_mri_is_k_over_e_for_uniform_routing_and_1_for_collapse():
    uniform = stats_of([[0, 1], [2, 3], [0, 2], [1, 3]])  # every expert in half the sets
    assert routing_imbalance(uniform) == pytest.approx(2 / 4)
    collapse = stats_of([[0, 1], [0, 2], [3, 0], [0, 1]])  # expert 0 in every set
    assert routing_imbalance(collapse) == 1.0


def test_pooling_hid_the_collapse_that_mri_per_distribution_shows():
    # Experience 0 always uses {0, 1}, experience 1 always {2, 3}: each distribution collapses
    # onto its own pair (MRI 1 each), while the pooled per-slot share of issue 13 read 0.25.
    stats = [stats_of([[0, 1]] * 4), stats_of([[2, 3]] * 4)]
    shares = [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]
    out = routing_metrics([[shares], [shares]], [0, 0, 1, 1], 1, [[stats], [stats]])
    assert out["routing/mri_max"] == 1.0
    assert out["routing/mri_mean"] == 1.0


RESTRICT_0 = [True, True, False, False]  # inferred experience 0: experts grown later hidden
OPEN = [True, True, True, True]


def test_chance_corrected_specialization_is_0_at_chance_and_1_when_perfect():
    origin = [0, 0, 1, 1]
    # exp 0 under a restrict mask: only its own experts are reachable, chance = 1 -> left out.
    exp0 = stats_of([[0, 1]] * 2, reachable=[RESTRICT_0] * 2)
    # exp 1, every token inferred right (all reachable, chance 1/2):
    perfect = stats_of([[2, 3], [2, 3]], reachable=[OPEN] * 2)
    uniform = stats_of([[0, 2], [1, 3]], reachable=[OPEN] * 2)
    assert specialization_corrected([exp0, perfect], origin, 1) == (pytest.approx(1.0), 1)
    assert specialization_corrected([exp0, uniform], origin, 1) == (pytest.approx(0.0), 1)
    # Half of exp 1's tokens inferred as 0 (own experts hidden from them): chance is
    # (0 * 2 + 1/2 * 2) / 4 slots = 1/4. Uniform over what each token can reach scores 0 ...
    mixed = stats_of([[0, 1], [0, 1], [0, 2], [1, 3]], reachable=[RESTRICT_0] * 2 + [OPEN] * 2)
    assert specialization_corrected([exp0, mixed], origin, 1) == (pytest.approx(0.0), 1)
    # ... while the raw share of own experts reads 2/8 = 0.25 for the same routing; routing all
    # four reachable slots of the open tokens to own experts gives (4/8 - 1/4) / (3/4) = 1/3.
    best = stats_of([[0, 1], [0, 1], [2, 3], [2, 3]], reachable=[RESTRICT_0] * 2 + [OPEN] * 2)
    assert specialization_corrected([exp0, best], origin, 1)[0] == pytest.approx(1 / 3)
    # Only left-out terms: NaN, not a number that looks measured.
    value, skipped = specialization_corrected([exp0], origin, 0)
    assert math.isnan(value) and skipped == 1


def test_chance_corrected_specialization_without_masks_uses_uniform_over_all_experts():
    origin = [0, 0, 1, 1]
    exp0 = stats_of([[0, 1], [0, 1]])  # chance 1/2, all own: 1
    exp1 = stats_of([[0, 2], [1, 3]])  # chance 1/2, half own: 0
    assert specialization_corrected([exp0, exp1], origin, 1) == (pytest.approx(0.5), 0)


def test_token_drift_counts_tokens_whose_set_changed_not_marginals():
    # Two tokens swap their experts: the marginal shares do not move, both tokens changed.
    before = [[0, 1], [2, 3]]
    after = [[2, 3], [0, 1]]
    assert changed_share(before, after) == 1.0
    assert total_variation([0.25] * 4, [0.25] * 4) == 0.0
    with pytest.raises(ValueError, match="not the same tokens"):
        changed_share(before, after[:1])


def test_token_drift_is_since_learned_and_token_change_since_the_last_evaluation():
    def s(*sets):
        return {"topk": [list(x) for x in sets]}

    history = [
        [s([0, 1], [0, 1]), s([0, 1], [0, 1])],  # after exp 0
        [s([0, 1], [0, 2]), s([2, 3], [2, 3])],  # after exp 1: one of exp 0's tokens moved
        [s([0, 1], [0, 1]), s([2, 3], [0, 1])],  # after exp 2: it moved back; exp 1's moved
    ]
    assert math.isnan(token_drift(history, 0))
    assert token_drift(history, 1) == pytest.approx(0.5)
    assert token_change(history, 1) == pytest.approx(0.5)
    # since learned: exp 0 unchanged (0), exp 1 half (0.5); since last: 0.5 and 0.5
    assert token_drift(history, 2) == pytest.approx(0.25)
    assert token_change(history, 2) == pytest.approx(0.5)


def test_routing_metrics_with_statistics_name_every_new_metric_per_layer():
    origin = [0, 0, 1, 1]
    shares0 = [[0.5, 0.5], [0.5, 0.5]]
    shares1 = [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]
    stats0 = [stats_of([[0, 1]], n_experts=2), stats_of([[0, 1]], n_experts=2)]
    stats1 = [stats_of([[0, 1]]), stats_of([[2, 3]])]
    out = routing_metrics([[shares0], [shares1]], origin, 1, [[stats0], [stats1]])
    metrics = (
        "specialization",
        "drift",
        "specialization_corrected",
        "specialization_skipped",
        "mri_max",
        "mri_mean",
        "token_drift",
        "token_change",
    )
    assert set(out) == {f"routing/{m}{x}" for m in metrics for x in ("", "/layer_0")}
    assert out["routing/specialization_corrected"] == pytest.approx(1.0)
    assert out["routing/specialization_skipped"] == 0
    assert out["routing/token_drift"] == 0.0
