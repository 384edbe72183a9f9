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


def test_every_text_study_holds_out_validation_and_test_documents_for_the_split_flag():
    """Issue 24's protocol on text: each text study's runs compose with validation and test
    documents held out, and ``--split validation`` (benchmark.split=validation) switches what
    is evaluated, not what is trained on."""
    from hydra import compose, initialize_config_dir

    text = {
        name: s for name, s in study.STUDIES.items()
        if any("lm_cpu" in o or "text_domains" in o for v in s["sweeps"].values() for o in v)
    }  # fmt: skip
    assert {"lm", "routing_lm", "routing_lm_long", "ablations_lm", "hf"} <= set(text)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for name, definition in text.items():  # the first job of each study
            job = [study.sweep_values(o)[0] for o in next(iter(definition["sweeps"].values()))]
            cfg = compose("config", [*job, "benchmark.split=validation"])
            assert cfg.benchmark.name == "text_domains", name
            assert cfg.benchmark.split == "validation"
            assert cfg.benchmark.validation_fraction > 0 < cfg.benchmark.test_fraction
