"""experiments/study.py resumes: jobs already FINISHED in the store are not run again."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))
_spec = importlib.util.spec_from_file_location("study", REPO / "experiments" / "study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def test_sweep_values_split_commas_but_not_inside_braces():
    assert study.sweep_values("seed=0,1") == ["seed=0", "seed=1"]
    assert study.sweep_values("method.strategy_args={alpha:1.0,temperature:2.0}") == [
        "method.strategy_args={alpha:1.0,temperature:2.0}"
    ]
    assert study.sweep_values("hydra.launcher.n_jobs=2") == ["hydra.launcher.n_jobs=2"]


def test_finished_jobs_are_skipped_and_remaining_seeds_regrouped():
    args = ["-m", "benchmark=permuted_digits", "method=naive,lifelong_moe", "seed=0,1,2"]
    done = {("naive", "permuted_digits", "0"), ("naive", "permuted_digits", "1")}
    done |= {("lifelong_moe", "permuted_digits", s) for s in "012"}
    todo = study.unfinished(args, done)
    assert todo == [["-m", "benchmark=permuted_digits", "method=naive", "seed=2"]]
    assert study.unfinished(args, done | {("naive", "permuted_digits", "2")}) == []
    # a renamed method is its own run: nothing of it is done
    renamed = study.unfinished([*args, "method.name=lifelong_moe_replay"], done)
    assert [t[-1] for t in renamed] == ["seed=0,1,2", "seed=0,1,2"]


def test_lr_area_of_the_recipe_is_about_half_of_constant():
    schedule = study.LRSchedule("cosine_rewarm", warmup_steps=20)
    assert 0.5 < study.lr_area(schedule, study.LM_STEPS) < 0.55
    assert study.lr_area(study.LRSchedule(), 58) == 1.0
    matched = study.AREA_MATCHED_LR * study.lr_area(schedule, study.LM_STEPS)
    assert abs(matched - study.LM_LR) < 1e-15
