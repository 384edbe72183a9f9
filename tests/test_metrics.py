"""Metrics on hand-made accuracy matrices, checked against hand-computed values and Avalanche."""

import math

import numpy as np
import pytest

from lifelong_moe.evaluation.metrics import (
    average_accuracy,
    average_incremental_accuracy,
    average_perplexity,
    bwt,
    first_last_forgetting,
    forgetting,
    fwt,
    mean_std,
    summarize,
    summarize_loss,
)

# Rows: after training on i; columns: test experience j. Accuracy on experience 0 rises after
# experience 1 (0.6 -> 0.8) before it drops (0.5): that is where max-based and first-last differ.
R = np.array(
    [
        [0.6, 0.2, 0.1],
        [0.8, 0.9, 0.3],
        [0.5, 0.7, 0.95],
    ]
)
B = np.array([0.1, 0.1, 0.1])


def test_average_accuracy_and_incremental():
    assert average_accuracy(R, 0) == pytest.approx(0.6)
    assert average_accuracy(R, 1) == pytest.approx((0.8 + 0.9) / 2)
    assert average_accuracy(R, 2) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    a = [0.6, 0.85, 2.15 / 3]
    assert average_incremental_accuracy(R) == pytest.approx(sum(a) / 3)
    assert average_incremental_accuracy(R, 1) == pytest.approx((0.6 + 0.85) / 2)


def test_forgetting_is_max_based():
    assert forgetting(R, 0) == 0.0
    # t=1: j=0: max(R[0,0]) - R[1,0] = 0.6 - 0.8
    assert forgetting(R, 1) == pytest.approx(-0.2)
    # t=2: j=0: max(0.6, 0.8) - 0.5 = 0.3; j=1: max(0.9) - 0.7 = 0.2
    assert forgetting(R, 2) == pytest.approx(0.25)


def test_bwt_and_first_last_forgetting():
    assert bwt(R, 0) == 0.0
    assert bwt(R, 1) == pytest.approx(0.8 - 0.6)
    # j=0: 0.5 - 0.6; j=1: 0.7 - 0.9
    assert bwt(R, 2) == pytest.approx((-0.1 - 0.2) / 2)
    assert first_last_forgetting(R, 2) == pytest.approx(0.15)
    assert first_last_forgetting(R, 0) == 0.0


def test_fwt():
    # j=1: R[0,1] - b[1] = 0.1; j=2: R[1,2] - b[2] = 0.2
    assert fwt(R, B) == pytest.approx(0.15)
    assert fwt(R, B, t=1) == pytest.approx(0.1)
    assert fwt(R, B, t=0) == 0.0


def test_summarize_keys_and_values():
    s = summarize(R, B)
    assert s == pytest.approx(
        {
            "acc/final": 2.15 / 3,
            "acc/avg_incremental": (0.6 + 0.85 + 2.15 / 3) / 3,
            "acc/forgetting": 0.25,
            "acc/bwt": -0.15,
            "acc/fwt": 0.15,
        }
    )


def test_single_experience_edge_case():
    s = summarize([[0.7]], [0.1])
    assert s == {
        "acc/final": pytest.approx(0.7),
        "acc/avg_incremental": pytest.approx(0.7),
        "acc/forgetting": 0.0,
        "acc/bwt": 0.0,
        "acc/fwt": 0.0,
    }
    assert summarize_loss([[1.0]]) == {
        "ppl/final": pytest.approx(math.e),
        "ppl/forgetting": 0.0,
        "loss/bwt": 0.0,
    }


def test_partial_matrix_mid_stream():
    # Only rows 0..1 exist so far (the runner computes metrics after every experience).
    assert forgetting(R[:2], 1) == pytest.approx(-0.2)
    assert summarize(R[:2], B)["acc/final"] == pytest.approx(0.85)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="t=3"):
        forgetting(R, 3)
    with pytest.raises(ValueError, match="2-D"):
        average_accuracy([0.1, 0.2], 0)
    with pytest.raises(ValueError, match="baseline"):
        fwt(R, [0.1, 0.1])


def test_summarize_loss():
    L = np.log(
        np.array(
            [
                [10.0, 50.0, 60.0],
                [8.0, 12.0, 40.0],
                [14.0, 20.0, 9.0],
            ]
        )
    )
    s = summarize_loss(L)
    assert s["ppl/final"] == pytest.approx((14 + 20 + 9) / 3)
    # j=0: 14 - min(10, 8) = 6; j=1: 20 - 12 = 8
    assert s["ppl/forgetting"] == pytest.approx(7.0)
    # j=0: log 14 - log 10; j=1: log 20 - log 12
    assert s["loss/bwt"] == pytest.approx((math.log(1.4) + math.log(20 / 12)) / 2)
    assert average_perplexity(L, 1) == pytest.approx(10.0)


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert mean_std([0.5]) == (0.5, 0.0, 1)
    assert mean_std([1.0, float("nan")]) == (1.0, 0.0, 1)
    m, s, n = mean_std([])
    assert math.isnan(m) and math.isnan(s) and n == 0


# --- cross-checks against Avalanche 0.6.0 (importing it pulls in torch: a few seconds) -----------


@pytest.fixture(scope="module")
def avalanche_forgetting():
    return pytest.importorskip("avalanche.evaluation.functional").forgetting


def test_first_last_matches_avalanche_functional(avalanche_forgetting):
    # Avalanche's functional form gives a <time, experience> matrix of first-minus-last drops.
    F = avalanche_forgetting(R)
    for t in range(3):
        expected = float(np.mean(F[t, :t])) if t > 0 else 0.0
        assert first_last_forgetting(R, t) == pytest.approx(expected)
        assert bwt(R, t) == pytest.approx(-expected)


def test_max_based_differs_from_avalanche(avalanche_forgetting):
    F = avalanche_forgetting(R)
    avalanche_final = float(np.mean(F[2, :2]))
    assert avalanche_final == pytest.approx(0.15)
    assert forgetting(R, 2) == pytest.approx(0.25)  # experience 0 peaked at 0.8, not at 0.6
    # Where accuracy on old experiences only ever falls, the two definitions coincide.
    monotone = np.array([[0.9, 0.1], [0.4, 0.8]])
    assert forgetting(monotone, 1) == pytest.approx(float(avalanche_forgetting(monotone)[1, 0]))


def test_matches_avalanche_stream_metrics():
    """Feed R to Avalanche's own standalone metric objects the way its plugins do."""
    fb = pytest.importorskip("avalanche.evaluation.metrics.forgetting_bwt")
    ft = pytest.importorskip("avalanche.evaluation.metrics.forward_transfer")
    for t in range(1, 3):
        f, b_metric = fb.Forgetting(), fb.BWT()
        for j in range(t):
            for m in (f, b_metric):
                m.update(j, R[j, j], initial=True)
                m.update(j, R[t, j])
        assert np.mean(list(f.result().values())) == pytest.approx(first_last_forgetting(R, t))
        assert np.mean(list(b_metric.result().values())) == pytest.approx(bwt(R, t))
    transfer = ft.ForwardTransfer()
    for j in range(1, 3):
        transfer.update(j, B[j], initial=True)
        transfer.update(j, R[j - 1, j])
    assert np.mean(list(transfer.result().values())) == pytest.approx(fwt(R, B))
