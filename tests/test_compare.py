"""lifelong-moe-compare against a temporary sqlite store written in the runner's exact layout."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lifelong_moe import names
from lifelong_moe.compare import build_filter, filter_clause, main
from lifelong_moe.evaluation.metrics import (
    average_accuracy,
    average_perplexity,
    bwt,
    forgetting,
    summarize,
    summarize_loss,
)

mlflow = pytest.importorskip("mlflow")
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

T = 3
B = [0.1, 0.1, 0.1]
PARAMS = {"total": 5000, "trainable": 3000, "active": 2000}


def accuracy_matrix(method: str, seed: int) -> np.ndarray:
    """Fake but consistent: naive forgets a lot, lifelong_moe little; seeds shift values."""
    drop = {"naive": 0.3, "lifelong_moe": 0.05}.get(method, 0.9)
    R = np.full((T, T), 0.1)
    for i in range(T):
        for j in range(i + 1):
            R[i, j] = max(0.01, 0.9 + 0.01 * seed - drop * (1 + 0.1 * seed) * (i - j))
    return R


def log_run(
    client,
    experiment_id,
    method,
    seed,
    status="FINISHED",
    matrix="accuracy",
    legacy=False,
    extra_params: dict[str, str] | None = None,
) -> str:
    """One run as the runner logs it; ``legacy`` logs the names used before issue 13, ``extra_params``
    adds params."""
    benchmark = "char_lm" if matrix == "perplexity" else "permuted_digits"
    tags = {
        "method": method,
        "benchmark": benchmark,
        "model": "moe_mlp",
        "seed": str(seed),
        "kind": "experiment",
        "matrix": matrix,
        "sweep_id": "s1",
    }
    run_id = client.create_run(experiment_id, run_name=f"{method}-{seed}", tags=tags).info.run_id
    params = {"method.name": method, "method.lr": "0.01", "benchmark.n_experiences": str(T)}
    params |= extra_params or {}
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    R = accuracy_matrix(method, seed)
    OLD = {new: old for old, new in names.LEGACY.items()} if legacy else {}
    metrics = []
    for i in range(T):
        if matrix == "accuracy":
            step = {f"acc/exp_{j}": R[i, j] for j in range(T)}
            step |= {"acc/seen": average_accuracy(R, i), "acc/forgetting": forgetting(R, i)}
            step["acc/bwt"] = bwt(R, i)
        else:
            L = np.log(1.0 / R)  # any positive loss matrix will do
            step = {f"ppl/exp_{j}": float(np.exp(L[i, j])) for j in range(T)}
            step["ppl/seen"] = average_perplexity(L, i)
        step |= {f"cost/params_{k}": v + 100 * i for k, v in PARAMS.items()}
        step |= {"cost/train_s": 1.0 + seed, "cost/peak_mb": 100.0}
        metrics += [Metric(OLD.get(k, k), float(v), 1000 + i, i) for k, v in step.items()]
    if matrix == "accuracy":
        final = summarize(R, B)
        final.pop("acc/forgetting"), final.pop("acc/bwt")  # already logged per step
    else:
        final = summarize_loss(np.log(1.0 / R))
    final["cost/train_total_s"] = T * (1.0 + seed)
    metrics += [Metric(OLD.get(k, k), float(v), 2000, T - 1) for k, v in final.items()]
    client.log_batch(run_id, metrics=metrics, tags=[RunTag("mlflow.note.content", "fake")])
    matrix_json = {"R": R.tolist(), "b": B, "experiences": list(range(T))}
    client.log_text(run_id, json.dumps(matrix_json), "accuracy_matrix.json")
    client.log_text(run_id, "method:\n  lr: 0.01\n", "config.yaml")
    client.log_text(run_id, json.dumps({"metrics": final}), "summary.json")
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """2 methods x 2 seeds, a FAILED run, a run elsewhere, and one perplexity run."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    main_id = client.create_experiment("lifelong-moe", artifact_location=str(root / "artifacts"))
    other_id = client.create_experiment("other", artifact_location=str(root / "artifacts-other"))
    for method in ("naive", "lifelong_moe"):
        for seed in (0, 1):
            log_run(client, main_id, method, seed)
    log_run(client, main_id, "naive", 7, status="FAILED")  # must be ignored
    log_run(client, other_id, "naive", 8)  # other experiment: must be ignored
    log_run(client, main_id, "lifelong_moe", 0, matrix="perplexity")
    return {"uri": uri, "root": root, "client": client}


def json_rows(store, capsys, *args) -> list[dict]:
    assert main(["--tracking-uri", store["uri"], "--format", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)["rows"]


def expected(method: str, metric: str, seeds=(0, 1)) -> tuple[float, float]:
    values = [summarize(accuracy_matrix(method, s), B)[metric] for s in seeds]
    return float(np.mean(values)), float(np.std(values, ddof=1))


def test_json_means_stds_and_counts(store, capsys):
    rows = json_rows(store, capsys)
    accuracy = {r["method"]: r for r in rows if r["matrix"] == "accuracy"}
    assert set(accuracy) == {"naive", "lifelong_moe"}
    for method, row in accuracy.items():
        assert row["n"] == 2 and len(row["run_ids"]) == 2
        assert row["benchmark"] == "permuted_digits"
        for metric in ("acc/final", "acc/avg_incremental", "acc/forgetting", "acc/bwt", "acc/fwt"):
            mean, std = expected(method, metric)
            assert row["metrics"][metric]["mean"] == pytest.approx(mean), metric
            assert row["metrics"][metric]["std"] == pytest.approx(std), metric
            assert row["metrics"][metric]["n"] == 2
        # Costs: the latest step's value per run (after the last expansion).
        assert row["metrics"]["cost/params_total"] == {"mean": 5200.0, "std": 0.0, "n": 2}
        time = row["metrics"]["cost/train_total_s"]
        assert time["mean"] == pytest.approx(4.5) and time["std"] == pytest.approx(
            np.std([3, 6], ddof=1)
        )
    # The FAILED run (seed 7) or the other experiment's run (seed 8) would shift naive's means.
    for seeds in ((0, 1, 7), (0, 1, 8)):
        for metric in ("acc/final", "acc/forgetting"):
            polluted = expected("naive", metric, seeds)[0]
            assert accuracy["naive"]["metrics"][metric]["mean"] != pytest.approx(polluted)


def test_perplexity_runs_get_their_own_table(store, capsys):
    rows = json_rows(store, capsys)
    [ppl] = [r for r in rows if r["matrix"] == "perplexity"]
    assert ppl["benchmark"] == "char_lm" and ppl["n"] == 1
    assert set(ppl["metrics"]) == {
        "ppl/final",
        "ppl/forgetting",
        "loss/bwt",
        *ROUTING_KEYS,
        *COST_KEYS,
    }
    L = np.log(1.0 / accuracy_matrix("lifelong_moe", 0))
    assert ppl["metrics"]["ppl/final"]["mean"] == pytest.approx(summarize_loss(L)["ppl/final"])
    assert ppl["metrics"]["ppl/final"]["std"] == 0.0


ROUTING_KEYS = (
    "routing/specialization",
    "routing/specialization_corrected",
    "routing/drift",
    "routing/token_drift",
    "routing/mri_max",
    "routing/inference_acc",
    "routing/max_imbalance",
)
COST_KEYS = (
    "cost/params_total",
    "cost/params_trainable",
    "cost/params_active",
    "cost/train_total_s",
)


def test_markdown_default(store, capsys):
    assert main(["--tracking-uri", store["uri"]]) == 0
    out = capsys.readouterr().out
    assert "### accuracy" in out and "### perplexity" in out
    mean, std = expected("naive", "acc/final")
    [line] = [x for x in out.splitlines() if x.startswith("| naive |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:3] == ["naive", "permuted_digits", "2"]
    assert cells[3] == f"{mean:.3f} ± {std:.3f}"


def test_csv_and_output_file(store, tmp_path, capsys):
    out = tmp_path / "table.csv"
    args = ["--format", "csv", "--output", str(out), "--filter", "matrix=accuracy"]
    assert main(["--tracking-uri", store["uri"], *args]) == 0
    assert capsys.readouterr().out == ""
    import csv

    rows = {r["method"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"naive", "lifelong_moe"}
    mean, std = expected("lifelong_moe", "acc/forgetting")
    assert float(rows["lifelong_moe"]["acc/forgetting_mean"]) == pytest.approx(mean)
    assert float(rows["lifelong_moe"]["acc/forgetting_std"]) == pytest.approx(std)
    assert rows["lifelong_moe"]["n"] == "2" and rows["lifelong_moe"]["matrix"] == "accuracy"


def test_filters_and_group_by(store, capsys):
    rows = json_rows(store, capsys, "--filter", "method=naive", "--group-by", "seed")
    assert sorted(r["seed"] for r in rows) == ["0", "1"]
    rows = json_rows(store, capsys, "--filter", "params.method.name=lifelong_moe")
    assert {r["matrix"] for r in rows} == {"accuracy", "perplexity"}
    rows = json_rows(store, capsys, "--filter", "metrics.`acc/final` < 0.8")
    assert [r["method"] for r in rows] == ["naive"]
    rows = json_rows(store, capsys, "--include-unfinished", "--filter", "method=naive")
    assert rows[0]["n"] == 3  # the FAILED run joins
    rows = json_rows(
        store, capsys, "--experiment", "lifelong-moe", "other", "--filter", "method=naive"
    )
    assert rows[0]["n"] == 3  # the other experiment's run joins


def test_filter_clauses():
    assert filter_clause("method=naive") == "tags.`method` = 'naive'"
    assert filter_clause("params.method.lr=0.01") == "params.`method.lr` = '0.01'"
    assert filter_clause("tags.seed=1") == "tags.`seed` = '1'"
    assert filter_clause("tags.method != 'naive'") == "tags.method != 'naive'"
    assert build_filter([], include_unfinished=False) == (
        "tags.`kind` = 'experiment' AND attributes.status = 'FINISHED'"
    )
    assert (
        build_filter(["kind=comparison"], include_unfinished=True) == "tags.`kind` = 'comparison'"
    )


def test_plot_writes_pngs(store, tmp_path, capsys):
    assert main(["--tracking-uri", store["uri"], "--plot", str(tmp_path / "plots")]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert names == [
        "accuracy_curves.png",
        "accuracy_forgetting.png",
        "accuracy_matrices.png",
        "perplexity_curves.png",
        "perplexity_forgetting.png",
    ]
    assert all((tmp_path / "plots" / n).stat().st_size > 1000 for n in names)


def test_log_creates_comparison_run(store, capsys):
    before = json_rows(store, capsys)
    assert main(["--tracking-uri", store["uri"], "--log", "--filter", "matrix=accuracy"]) == 0
    err = capsys.readouterr().err
    assert "logged comparison run" in err
    client = store["client"]
    experiment = client.get_experiment_by_name("lifelong-moe")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    [run] = client.search_runs([experiment.experiment_id], "tags.kind = 'comparison'")
    assert run.info.status == "FINISHED"
    url = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert (
        f"See the comparison: mlflow ui --backend-store-uri {store['uri']}   then open {url}" in err
    )
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"comparison.md", "comparison.csv", "comparison.json", "plots"} <= files
    assert "comparison_table.json" in files
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {
        "plots/accuracy_curves.png",
        "plots/accuracy_forgetting.png",
        "plots/accuracy_matrices.png",
    }
    note = run.data.tags["mlflow.note.content"]
    assert (
        "least forgetting: **lifelong_moe**" in note and "| naive | permuted_digits | 2 |" in note
    )
    # The comparison run itself never enters a later comparison.
    assert json_rows(store, capsys) == before


def test_errors_are_one_line_with_status_2(store, tmp_path, capsys):
    cases = [
        ["--tracking-uri", store["uri"], "--filter", "method=nonexistent"],
        ["--tracking-uri", store["uri"], "--experiment", "missing"],
        ["--tracking-uri", f"sqlite:///{tmp_path}/absent.db"],
        ["--tracking-uri", store["uri"], "--group-by", "colour"],
        ["--tracking-uri", store["uri"], "--filter", "metrics.x >>> 1"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert not (tmp_path / "absent.db").exists()  # reading never creates a store


def test_console_entry_point_nothing_matches(store):
    """The real process: exactly one line on stderr (no MLflow log noise) and exit status 2."""
    argv = ["--tracking-uri", store["uri"], "--filter", "method=nonexistent"]
    result = subprocess.run(
        [sys.executable, "-m", "lifelong_moe.compare", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no runs match" in result.stderr


def test_store_with_pre_rename_names_compares_alike(store, tmp_path, capsys):
    """Runs logged as ``forgetting``, ``params/total``, ... (before issue 13) read as today's."""
    uri = f"sqlite:///{tmp_path}/old.db"
    client = mlflow.MlflowClient(uri)
    eid = client.create_experiment("lifelong-moe", artifact_location=str(tmp_path / "a"))
    for method in ("naive", "lifelong_moe"):
        for seed in (0, 1):
            log_run(client, eid, method, seed, legacy=True)
    assert "forgetting" in client.search_runs([eid])[0].data.metrics
    old = json_rows({"uri": uri}, capsys, "--filter", "matrix=accuracy")
    new = json_rows(store, capsys, "--filter", "matrix=accuracy")
    key = lambda r: r["method"]  # noqa: E731
    for a, b in zip(sorted(old, key=key), sorted(new, key=key), strict=True):
        assert a["metrics"].keys() == b["metrics"].keys()
        for metric, stats in b["metrics"].items():
            assert a["metrics"][metric] == pytest.approx(stats), metric
    folder = tmp_path / "plots"
    assert main(["--tracking-uri", uri, "--plot", str(folder), "--format", "csv"]) == 0
    assert (folder / "accuracy_curves.png").is_file()


def test_runs_recorded_under_old_param_names_group_with_today_s(tmp_path, capsys):
    """A run recorded with ``trainer.lr_schedule`` (before issue 21) and one with
    ``schedule.name`` fall into one group, asked for by either name."""
    uri = f"sqlite:///{tmp_path}/renamed.db"
    client = mlflow.MlflowClient(uri)
    eid = client.create_experiment("lifelong-moe", artifact_location=str(tmp_path / "a"))
    old = log_run(client, eid, "naive", 0, extra_params={"trainer.lr_schedule": "cosine_rewarm"})
    new = log_run(client, eid, "naive", 1, extra_params={"schedule.name": "cosine_rewarm"})
    constant = log_run(client, eid, "naive", 2, extra_params={"schedule.name": "constant"})
    for key in ("schedule.name", "trainer.lr_schedule", "params.trainer.lr_schedule"):
        rows = json_rows({"uri": uri}, capsys, "--group-by", f"method,{key}")
        groups = [(r[key], sorted(r["run_ids"])) for r in rows]
        assert groups == [("constant", [constant]), ("cosine_rewarm", sorted([old, new]))], key


def test_reference_shows_paired_intervals_over_seeds(store, capsys):
    assert main(["--tracking-uri", store["uri"], "--format", "json", "--reference", "naive"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reference"] == "naive"
    [paired] = [r for r in out["paired"] if r["matrix"] == "accuracy"]
    assert paired["method"] == "lifelong_moe"
    for metric in ("acc/final", "acc/forgetting"):
        d = [
            summarize(accuracy_matrix("lifelong_moe", s), B)[metric]
            - summarize(accuracy_matrix("naive", s), B)[metric]
            for s in (0, 1)
        ]
        ci = paired["metrics"][metric]
        assert ci["n"] == 2 and ci["mean"] == pytest.approx(np.mean(d))
        half = 12.706204736174698 * np.std(d, ddof=1) / np.sqrt(2)  # t_{0.975, 1}
        assert ci["high"] - ci["low"] == pytest.approx(2 * half)
    assert main(["--tracking-uri", store["uri"], "--reference", "naive"]) == 0
    text = capsys.readouterr().out
    assert "Difference from naive (accuracy)" in text and "| lifelong_moe |" in text
    assert main(["--tracking-uri", store["uri"], "--reference", "ewc"]) == 2
    assert "no matching run has method=ewc" in capsys.readouterr().err
