"""lifelong-moe-compare on language-model runs with downstream tasks: each lm-eval task's metric
after the last experience is a column beside the others, and the paired intervals of
``--reference`` include it. The store is written with MlflowClient in the runner's layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy import stats

from lifelong_moe import names
from lifelong_moe.compare import main

T, SEEDS = 3, (0, 1, 2)
TASKS = ("arith/acc", "arith/acc_norm", "cloze/exact_match")


def downstream(method: str, seed: int, i: int, key: str) -> float:
    """The score of ``key`` after experience ``i``: methods, seeds, tasks and steps all differ."""
    base, spread = {"naive": (0.30, 0.01), "lifelong_moe": (0.45, 0.03)}[method]
    return base + 0.07 * TASKS.index(key) + spread * seed**2 + 0.05 * i


def log_run(client: MlflowClient, experiment_id: str, method: str, seed: int) -> None:
    tags = {
        "method": method,
        "benchmark": "token_domains",
        "model": "moe_lm",
        "seed": str(seed),
        "kind": "experiment",
        "matrix": "perplexity",
    }
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param("method.name", method)])
    metrics = []
    for i in range(T):
        step = {names.PPL_SEEN: 10.0 + i, names.COST_TRAIN_S: 1.0}
        # downstream/<task>/<metric> after every experience, plus a standard error
        step |= {f"downstream/{k}": downstream(method, seed, i, k) for k in TASKS}
        step["downstream/arith/acc_stderr"] = 0.01
        metrics += [Metric(k, v, 1000 + i, i) for k, v in step.items()]
    final = {names.PPL_FINAL: 12.0 + seed, names.PPL_FORGETTING: 0.5, names.LOSS_BWT: 0.1}
    metrics += [Metric(k, v, 2000, T - 1) for k, v in final.items()]
    client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, "FINISHED")


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("lifelong-moe", artifact_location=str(root / "a"))
    for method in ("naive", "lifelong_moe"):
        for seed in SEEDS:
            log_run(client, experiment_id, method, seed)
    return uri


def final(method: str, key: str) -> list[float]:
    return [downstream(method, s, T - 1, key) for s in SEEDS]


def test_downstream_metrics_are_columns_with_their_final_values(uri, capsys) -> None:
    assert main(["--tracking-uri", uri, "--format", "json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    for method, row in rows.items():
        keys = list(row["metrics"])
        assert keys[:6] == [
            names.PPL_FINAL,
            names.PPL_FORGETTING,
            names.LOSS_BWT,
            *(f"downstream/{k}" for k in sorted(TASKS)),
        ]
        assert "downstream/arith/acc_stderr" not in keys
        for key in TASKS:
            got = row["metrics"][f"downstream/{key}"]
            values = final(method, key)
            assert got["n"] == 3
            assert got["mean"] == pytest.approx(np.mean(values))
            assert got["std"] == pytest.approx(np.std(values, ddof=1))

    assert main(["--tracking-uri", uri]) == 0
    header, _, *lines = capsys.readouterr().out.splitlines()
    cells = [c.strip() for c in header.strip("|").split("|")]
    at = cells.index("downstream/cloze/exact_match")
    assert cells[at - 2 : at] == ["downstream/arith/acc", "downstream/arith/acc_norm"]
    naive = next(c for c in (line.strip("|").split("|") for line in lines) if "naive" in c[0])
    values = final("naive", "cloze/exact_match")
    want = f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"
    assert naive[at].strip() == want


def test_reference_gives_paired_intervals_of_downstream_metrics(uri, capsys) -> None:
    assert main(["--tracking-uri", uri, "--format", "json", "--reference", "naive"]) == 0
    (paired,) = json.loads(capsys.readouterr().out)["paired"]
    assert paired["method"] == "lifelong_moe"
    for key in TASKS:
        d = np.subtract(final("lifelong_moe", key), final("naive", key))
        ci = paired["metrics"][f"downstream/{key}"]
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert ci["n"] == 3 and ci["mean"] == pytest.approx(d.mean()) and half > 0.01
        assert (ci["low"], ci["high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert main(["--tracking-uri", uri, "--reference", "naive"]) == 0
    text = capsys.readouterr().out
    paired_table = text[text.index("Difference from naive (perplexity)") :]
    header = next(line for line in paired_table.splitlines() if line.startswith("| method"))
    assert header.endswith(
        "| downstream/arith/acc | downstream/arith/acc_norm | downstream/cloze/exact_match |"
    )
