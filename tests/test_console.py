"""What a run prints per experience: a language model's line carries its training throughput."""

from __future__ import annotations

from lifelong_moe import names
from lifelong_moe.run.console import experience_line

ROW = {
    names.exp_metric(names.ACC, 0): 0.5,
    names.ACC_SEEN: 0.5,
    names.ACC_FORGETTING: 0.0,
    names.ACC_BWT: 0.0,
    names.COST_PARAMS_TOTAL: 1000,
    names.COST_PARAMS_ACTIVE: 500,
    names.COST_TOKENS_PER_S: 41_234.0,
}


def test_language_line_shows_tokens_per_second() -> None:
    line = experience_line(0, 2, "LifelongMoE", {**ROW, names.PPL_SEEN: 9.0}, 12.3, 0.4)
    assert "ppl seen 9.00" in line and "train 12.3s (41.2k tok/s)  eval 0.40s" in line


def test_classification_line_has_no_token_rate() -> None:
    line = experience_line(0, 2, "Naive", ROW, 1.5, 0.2)
    assert "tok/s" not in line and "train 1.5s  eval 0.20s" in line
