"""What one real run leaves in MLflow (issue 13): names, loss terms, description, tables, inputs,
system metrics, no resume state once FINISHED, a console without library warnings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lifelong_moe import names
from tests.conftest import FAST, run_cli, runs, store_uri

T = 2
ARGS = [
    "method=lifelong_moe",
    "benchmark=permuted_digits",
    f"benchmark.n_experiences={T}",
    "trainer.max_epochs=1",
    "seed=3",
    *FAST[1:],
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One Lifelong-MoE run of two experiences (so that distillation is active in the second)."""
    workdir = tmp_path_factory.mktemp("report")
    uri = store_uri(workdir)
    result = run_cli(workdir, f"tracking.uri={uri}", *ARGS)
    (run,) = runs(uri)
    return {"uri": uri, "run": run, "client": MlflowClient(uri), "console": result}


def load_table(client, run_id: str, path: str):
    """The table as MLflow's UI reads it (client.load_table searches the global tracking URI)."""
    import pandas as pd

    return pd.read_json(client.download_artifacts(run_id, path), orient="split")


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_metric_names_and_steps(finished):
    client, run = finished["client"], finished["run"]
    run_id, logged = run.info.run_id, run.data.metrics
    per_experience = [
        names.ACC_SEEN,
        names.ACC_FORGETTING,
        names.ACC_BWT,
        names.exp_metric(names.ACC, 0),
        names.COST_PARAMS_TOTAL,
        names.COST_PARAMS_TRAINABLE,
        names.COST_PARAMS_ACTIVE,
        names.COST_TRAIN_S,
        names.COST_EVAL_S,
        names.COST_PEAK_MB,
        names.TRAIN_LOSS,
        names.TRAIN_CE,
    ]
    for key in per_experience:
        assert steps(client, run_id, key) == list(range(T)), key
    for key in (
        names.ACC_FINAL,
        names.ACC_AVG_INCREMENTAL,
        names.ACC_FWT,
        names.COST_TRAIN_TOTAL_S,
    ):
        assert steps(client, run_id, key) == [T - 1], key
    assert not set(names.LEGACY) & set(logged), "a pre-issue-13 name was logged"
    # Everything but MLflow's system metrics sits under a family the UI groups by.
    families = {"acc", "cost", "train", "routing", "system"}
    assert {k.split("/")[0] for k in logged} <= families, sorted(logged)


def test_loss_terms_sum_to_the_total(finished):
    client, run_id = finished["client"], finished["run"].info.run_id

    def at(key: str, step: int) -> float:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}[step]

    # Experience 0: cross-entropy and balance; experience 1 adds distillation to the teacher.
    assert steps(client, run_id, names.train_term("balance")) == [0, 1]
    assert steps(client, run_id, names.train_term("kd")) == [1]
    for step, terms in ((0, ("ce", "balance")), (1, ("ce", "balance", "kd"))):
        total = sum(at(names.train_term(k), step) for k in terms)
        assert total == pytest.approx(at(names.TRAIN_LOSS, step), rel=1e-5)
    assert at(names.train_term("kd"), 1) > 0


def test_resume_state_is_gone_once_finished(finished):
    client, run = finished["client"], finished["run"]
    assert run.info.status == "FINISHED"
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names.RESUME_FOLDER not in top and "resume" not in top
    assert {names.CONFIG, names.ACCURACY_MATRIX, names.SUMMARY} <= top
    # log_checkpoints=false: no checkpoints either, so nothing but results is left.
    assert names.CHECKPOINTS not in top


def test_description_tables_and_inputs(finished):
    client, run = finished["client"], finished["run"]
    run_id = run.info.run_id
    R = json.loads(Path(client.download_artifacts(run_id, names.ACCURACY_MATRIX)).read_text())["R"]
    note = run.data.tags[names.TAG_DESCRIPTION]
    assert "**lifelong_moe** on **permuted_digits**" in note and "seed 3" in note
    for row in R:
        assert " | ".join(f"{v:.3f}" for v in row) in note
    assert f"| `{names.ACC_FORGETTING}` |" in note

    logged_tables = json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert {"path": names.ACCURACY_TABLE, "type": "table"} in logged_tables
    assert {"path": names.ROUTING_TABLE, "type": "table"} in logged_tables
    table = load_table(client, run_id, names.ACCURACY_TABLE)
    assert len(table) == T * T
    for row in table.itertuples():
        assert row.accuracy == pytest.approx(R[row.trained_on][row.evaluated_on], abs=1e-9)
    routing = load_table(client, run_id, names.ROUTING_TABLE)
    assert set(routing["trained_on"]) == set(range(T))
    sums = routing.groupby(["trained_on", "layer", "evaluated_on"])["share"].sum()
    assert sums.to_numpy() == pytest.approx(1.0)

    (dataset,) = client.get_run(run_id).inputs.dataset_inputs
    assert dataset.dataset.name == "permuted_digits" and len(dataset.dataset.digest) == 36
    assert json.loads(dataset.dataset.profile)["n_experiences"] == T


def test_summary_is_rounded_and_system_metrics_logged(finished):
    client, run = finished["client"], finished["run"]
    text = Path(client.download_artifacts(run.info.run_id, names.SUMMARY)).read_text()
    assert not re.search(r"\d\.\d{5,}", text), text
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_console_has_only_our_lines(finished):
    console = finished["console"].stdout + finished["console"].stderr
    noise = ("Warning", "warn(", "LeafSpec", "eval mode", "monitoring system metrics")
    noise += ("Creating initial MLflow database tables", "Downloading artifacts")
    for pattern in noise:
        assert pattern not in console, console
    assert re.search(r"^\[2/2\] LifelongMoE on experience 1", console, re.M)


# --- the pure parts, without a run ----------------------------------------------------------------


def test_report_helpers():
    from types import SimpleNamespace

    from lifelong_moe.data.text import DomainInfo
    from lifelong_moe.tracking import report

    assert report.rounded({"R": [[0.123456789]], "n": 3, "s": "x"}) == {
        "R": [[0.1235]],
        "n": 3,
        "s": "x",
    }
    table = report.matrix_table("accuracy", [[0.5, 0.1], [0.4, 0.9]], accuracy_til=[[1, 2], [3, 4]])
    assert table["trained_on"] == [0, 0, 1, 1] and table["evaluated_on"] == [0, 1, 0, 1]
    assert table["accuracy"] == [0.5, 0.1, 0.4, 0.9] and table["accuracy_til"] == [1, 2, 3, 4]

    sha = "ab" * 32
    domain = DomainInfo("english", "pydoc", 3, 0, 100, sha, {"train": 5, "val": 1, "test": 1})
    text = SimpleNamespace(name="text_domains", domains=[domain])
    (entry,) = report.dataset_inputs({"name": "text_domains"}, text)
    assert entry["name"] == "text_domains/english" and entry["digest"] == sha[:36]
    assert json.loads(entry["profile"])["sha256"] == sha and entry["context"] == "experience_0"

    experiences = [SimpleNamespace(classes=[0, 1]), SimpleNamespace(classes=[2, 3])]
    stream = SimpleNamespace(
        name="split", experiences=experiences, n_classes=4, input_shape=(8,), scenario="ci"
    )
    bench = {"name": "split_digits", "seed": 0, "n_experiences": 2}
    one = report.dataset_inputs(bench, _Sized(stream))[0]
    other = report.dataset_inputs({**bench, "seed": 1}, _Sized(stream))[0]
    assert len(one["digest"]) == 36 and one["digest"] != other["digest"]
    assert json.loads(one["profile"])["classes"] == [[0, 1], [2, 3]]


class _Sized:
    """A stream stand-in with len()."""

    def __init__(self, ns) -> None:
        self.__dict__.update(vars(ns))

    def __len__(self) -> int:
        return len(self.experiences)
