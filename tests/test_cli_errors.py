"""Bad input: one clear line naming the value and what was expected, exit 2, no run recorded."""

from __future__ import annotations

import pytest

from tests.conftest import FAST, run_cli, runs, store_uri

CASES = {
    "unknown method": (["method=nope"], ["method 'nope'", "naive", "lifelong_moe"]),
    "unknown benchmark": (["benchmark=nope"], ["benchmark 'nope'", "split_digits"]),
    "unknown model": (["model=nope"], ["model 'nope'", "moe_mlp"]),
    "classes do not divide": (["benchmark.n_experiences=3"], ["n_experiences=3"]),
    "zero epochs": (["trainer.max_epochs=0"], ["trainer.max_epochs=0", "positive"]),
    "negative lr": (["method.lr=-0.1"], ["method.lr=-0.1", "positive"]),
    "top_k above n_experts": (["model=moe_mlp", "model.top_k=5"], ["top_k", "5", "n_experts"]),
    "negative growth": (
        ["method=lifelong_moe", "method.experts_per_experience=-1"],
        ["experts_per_experience=-1"],
    ),
    "lifelong_moe on a dense model": (["method=lifelong_moe", "model=mlp"], ["MoE"]),
    "offline classic benchmark": (
        ["benchmark=split_mnist", "benchmark.dataset_root=/nonexistent/mnist"],
        ["/nonexistent/mnist"],
    ),
    "unreachable tracking server": (
        ["tracking.uri=http://127.0.0.1:9"],
        ["127.0.0.1:9", "reachable"],
    ),
    "unwritable store": (
        ["tracking.uri=sqlite:////sys/mlflow.db"],
        ["/sys/mlflow.db", "not writable"],
    ),
    "multi-node without ddp": (["trainer.num_nodes=2"], ["trainer.num_nodes=2", "strategy=ddp"]),
    "store folder missing": (
        ["tracking.uri=sqlite:////nonexistent/dir/mlflow.db"],
        ["/nonexistent/dir"],
    ),
    "system metrics interval not positive": (
        ["tracking.system_metrics_interval_s=0"],
        ["tracking.system_metrics_interval_s=0", "positive"],
    ),
    "file store": (
        ["tracking.uri=file:./mlruns"],
        ["tracking.uri=file:./mlruns", "sqlite:///", "MLFLOW_ALLOW_FILE_STORE=true"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(workdir, case):
    overrides, expected = CASES[case]
    uri = store_uri(workdir)
    own_store = any(o.startswith("tracking.uri=") for o in overrides)
    args = [*([] if own_store else [f"tracking.uri={uri}"]), *FAST, *overrides]
    result = run_cli(workdir, *args, check=False, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.stderr
    assert not [r for r in runs(uri) if r.info.status == "FINISHED"]
