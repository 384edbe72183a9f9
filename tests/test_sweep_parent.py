"""A sweep's parent run is its comparison: one per sweep, RUNNING until the last job ended,
then holding the table, plots and description that lifelong-moe-compare computes; FAILED with a
count when a job crashed. Also the pieces: URLs, job counts, the verdict, ``± `` only for n > 1.

The end-to-end tests run the real CLI on a sqlite store (tests/test_tracking_server.py does the
same on an ``mlflow server``, tests/test_postgres.py on PostgreSQL).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from lifelong_moe import compare
from lifelong_moe.names import MODEL_DEVELOPMENT
from lifelong_moe.names import TAG_EXPERIMENT_KIND as EXPERIMENT_KIND
from lifelong_moe.tracking import queries
from lifelong_moe.tracking.store import ui_hint, ui_url
from lifelong_moe.tracking.sweep import (
    PARENT_COLOR,
    RUN_COLOR_TAG,
    expected_jobs,
    parent_metric,
    sweep_id_from_dir,
)
from tests.conftest import FAST, run_cli, runs, store_uri

# The MLflow UI opens its model-training view (not GenAI) when the URL asks for it.
MODE = "?workflowType=machine_learning"

SWEEP = ["method=naive,joint", "seed=0,1", "benchmark=permuted_digits"]
SMALL = ["benchmark.n_experiences=2", *FAST, "trainer.max_epochs=1"]
PROBE = "+hydra.callbacks.probe._target_=tests.test_sweep_parent.ParentProbe"


class ParentProbe(Callback):
    """Test-only Hydra callback: in each job's own process, after the job's run ended, records
    the status of the sweep's parent run (named points, no timing) in ``probe_<job>.json``."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        client = MlflowClient(config.tracking.uri)
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        sweep_id = config.tracking.sweep_id or sweep_id_from_dir(config.hydra.sweep.dir)
        (parent,) = client.search_runs(
            [experiment.experiment_id], f"tags.kind = 'sweep' and tags.sweep_id = '{sweep_id}'"
        )
        mine = client.search_runs(
            [experiment.experiment_id],
            f"tags.kind = 'experiment' and tags.sweep_id = '{sweep_id}' "
            f"and tags.seed = '{config.seed}' and tags.method = '{config.method.name}'",
        )
        record = {"parent": parent.info.status, "runs": [r.info.status for r in mine]}
        path = Path(config.hydra.sweep.dir) / f"probe_{config.hydra.job.num}.json"
        path.write_text(json.dumps(record))


def check_parent(uri: str, experiment: str = "lifelong-moe") -> tuple[Any, list]:
    """The one parent and its runs; the parent spans them and its table equals their metrics."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp.tags[EXPERIMENT_KIND] == MODEL_DEVELOPMENT
    (parent,) = runs(uri, experiment, kind="sweep")
    children = runs(uri, experiment)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.data.tags["sweep_id"] for r in children} == {parent.data.tags["sweep_id"]}
    # Opened before the first run started, closed after the last one ended.
    assert parent.info.start_time <= min(r.info.start_time for r in children)
    assert parent.info.end_time >= max(r.info.end_time for r in children)
    # A colour of its own in the UI's charts (the tag the UI's colour picker writes).
    assert parent.data.tags[RUN_COLOR_TAG] == PARENT_COLOR
    return parent, children


def check_table(uri: str, parent: Any, children: list) -> None:
    """The parent's logged table: one row per method x benchmark, equal to the runs' metrics."""
    client = MlflowClient(uri)
    path = client.download_artifacts(parent.info.run_id, compare.TABLE_ARTIFACT)
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    done = [r for r in children if r.info.status == "FINISHED"]
    assert sorted((r["method"], r["benchmark"]) for r in rows) == sorted(
        {(r.data.tags["method"], r.data.tags["benchmark"]) for r in done}
    )
    for row in rows:
        mine = [r for r in done if r.data.tags["method"] == row["method"]]
        assert row["n"] == len(mine)
        for metric in ("acc/final", "acc/forgetting", "acc/bwt", "cost/params_total"):
            values = [r.data.metrics[metric] for r in mine]
            assert row[f"{metric} mean"] == pytest.approx(statistics.mean(values), abs=1e-6)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            assert row[f"{metric} std"] == pytest.approx(spread, abs=1e-6)
    # The parent's own charts: per method, the mean of its runs' final metrics and A_t curve.
    for row in rows:
        for metric in ("acc/final", "acc/forgetting"):
            value = parent.data.metrics[parent_metric(metric, row["method"])]
            assert value == pytest.approx(row[f"{metric} mean"], abs=1e-6)
        mine = [r for r in done if r.data.tags["method"] == row["method"]]
        curves = [queries.metric_history(client, r.info.run_id, "acc/seen") for r in mine]
        mean = [statistics.mean(values) for values in zip(*curves, strict=True)]
        curve = queries.metric_history(
            client, parent.info.run_id, parent_metric("acc/seen", row["method"])
        )
        assert curve == pytest.approx(mean) and len(curve) == len(curves[0]) > 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {
        "plots/accuracy_curves.png",
        "plots/accuracy_forgetting.png",
        "plots/accuracy_matrices.png",
    } <= artifacts


@pytest.mark.slow
def test_parallel_sweep_parent_is_the_comparison(workdir):
    uri = store_uri(workdir)
    result = run_cli(
        workdir,
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        PROBE,
        *SWEEP,
        *SMALL,
        f"tracking.uri={uri}",
    )
    parent, children = check_parent(uri)
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.runs_finished"] == "4/4"
    check_table(uri, parent, children)
    # At the end of every job, its own run already FINISHED, the parent was still RUNNING.
    probes = [json.loads(p.read_text()) for p in workdir.glob("multirun/*/*/probe_*.json")]
    assert len(probes) == 4
    assert all(p == {"parent": "RUNNING", "runs": ["FINISHED"]} for p in probes)

    note = parent.data.tags["mlflow.note.content"]
    assert "4 of 4 runs finished" in note and "least forgetting" in note
    assert "| joint | permuted_digits | 2 |" in note
    exp_id = parent.info.experiment_id
    url = f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{parent.info.run_id}{MODE}"
    assert f"See the sweep (its comparison): mlflow ui --backend-store-uri {uri}" in result.stdout
    assert result.stdout.rstrip().endswith(url)


@pytest.mark.slow
def test_a_failing_job_fails_the_parent_and_the_sweep_goes_on(workdir):
    uri = store_uri(workdir)
    # The basic launcher runs jobs in order: the poisoned one fails first (NaN loss), and the
    # sweep still runs naive after it; the process then exits non-zero.
    poisoned = "tests.test_nonfinite.PoisonSecondExperience"
    result = run_cli(
        workdir,
        "-m",
        f"method._target_={poisoned},lifelong_moe.methods.naive.Naive",
        "benchmark=permuted_digits",
        *SMALL,
        f"tracking.uri={uri}",
        check=False,
    )
    assert result.returncode == 1
    parent, children = check_parent(uri)
    by_target = {r.data.params["method._target_"]: r.info.status for r in children}
    assert by_target == {poisoned: "FAILED", "lifelong_moe.methods.naive.Naive": "FINISHED"}
    assert parent.info.status == "FAILED"
    assert parent.data.tags["sweep.runs_finished"] == "1/2"
    assert parent.data.tags["sweep.runs_failed"] == "1"
    assert "1 of 2 runs finished (status FAILED" in parent.data.tags["mlflow.note.content"]
    check_table(uri, parent, children)
    assert "1/2 runs finished, parent run FAILED" in result.stdout
    # The job's one line, then once more after its overrides when the sweep ends; no traceback.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1] and "marked FAILED" in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_job_with_a_config_error_does_not_stop_the_sweep(workdir):
    uri = store_uri(workdir)
    # Block 9 of a 2-block model: well typed (the command line passes it), refused when the
    # first job builds its model, before training; the second job must still run.
    result = run_cli(
        workdir,
        "-m",
        "model.moe_blocks=[9],[0]",
        "benchmark=permuted_digits",
        "method=naive",
        "model=moe_mlp",
        *SMALL,
        f"tracking.uri={uri}",
        check=False,
    )
    assert result.returncode == 1
    (parent,) = runs(uri, kind="sweep")
    (child,) = runs(uri)
    assert child.info.status == "FINISHED" and child.data.params["model.moe_blocks"] == "[0]"
    assert parent.info.status == "FAILED"
    assert parent.data.tags["sweep.runs_finished"] == "1/2"
    assert any(
        "model.moe_blocks" in line
        for line in result.stderr.splitlines()
        if line.startswith("error:")
    )
    assert "Traceback" not in result.stderr


def test_urls_open_the_run_in_the_ui():
    assert (
        ui_url("sqlite:///mlflow.db", "3", "abc")
        == "http://127.0.0.1:5000/#/experiments/3/runs/abc" + MODE
    )
    assert (
        ui_url("http://host:5000/", "3", "abc")
        == "http://host:5000/#/experiments/3/runs/abc" + MODE
    )
    assert ui_url("http://host:5000", "3") == "http://host:5000/#/experiments/3/runs" + MODE
    assert ui_hint("sqlite:///x.db", "1", "r") == (
        "mlflow ui --backend-store-uri sqlite:///x.db   then open "
        "http://127.0.0.1:5000/#/experiments/1/runs/r" + MODE
    )
    assert ui_hint("https://mlflow.example.org", "1", "r") == (
        "https://mlflow.example.org/#/experiments/1/runs/r" + MODE
    )


def test_expected_jobs_counts_the_basic_sweepers_grid():
    def config(task: list[str], params: dict | None = None, target: str = "BasicSweeper"):
        sweeper = {"_target_": f"hydra._internal.core_plugins.basic_sweeper.{target}"}
        sweeper["params"] = params
        return OmegaConf.create({"hydra": {"sweeper": sweeper, "overrides": {"task": task}}})

    assert expected_jobs(config(["method=naive,joint", "seed=0,1,2", "trainer.max_epochs=1"])) == 6
    assert expected_jobs(config(["seed=0,1"], {"method": "a,b"})) == 4
    assert expected_jobs(config(["seed=range(5)"])) == 5
    assert expected_jobs(config(["seed=0,1"], target="OptunaSweeper")) is None


def group(method: str, final: list[float], forgetting: list[float]) -> compare.Group:
    g = compare.Group("accuracy", (method, "permuted_digits"))
    for i, (a, f) in enumerate(zip(final, forgetting, strict=True)):
        g.runs.append(
            compare.RunRecord(f"{method}{i}", {}, {}, {"acc/final": a, "acc/forgetting": f})
        )
    return g


def test_verdict_names_least_forgetting_and_best_final_accuracy():
    groups = [
        group("naive", [0.4, 0.5], [0.6, 0.7]),
        group("joint", [0.95, 0.93], [0.3, 0.5]),
        group("lifelong_moe", [0.8], [0.1]),
    ]
    (line,) = compare.verdict(groups, ["method", "benchmark"])
    assert line == (
        "permuted_digits (accuracy): least forgetting: **lifelong_moe** (0.100, n=1); "
        "best acc/final: **joint** (0.940 ± 0.014, n=2)"
    )


def test_markdown_shows_no_spread_for_a_single_run():
    text = compare.to_markdown([group("naive", [0.5], [0.25])], ["method", "benchmark"])
    assert "| naive | permuted_digits | 1 | 0.500 | - | 0.250 |" in text
    assert "±" not in text
    text = compare.to_markdown([group("naive", [0.5, 0.7], [0.25, 0.25])], ["method", "benchmark"])
    assert "0.600 ± 0.141" in text and "0.250 ± 0.000" in text
