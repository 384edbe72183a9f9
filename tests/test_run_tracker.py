"""What RunTracker records: no URL password anywhere (params, tags, description, config.yaml,
printed URLs), and tables that a resumed run rewrites instead of appending to. In process, on a
sqlite store: no PostgreSQL server is needed to see what would be logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lifelong_moe.tracking.mlflow_run import RunTracker, flatten
from lifelong_moe.tracking.store import redact, ui_hint
from tests.conftest import store_uri

SECRET = "s3cr:et/pw"
TEAM = f"postgresql+psycopg://alice:{SECRET}@db.example:5432/mlflow"


def test_redact_hides_url_passwords_only():
    assert redact(TEAM) == "postgresql+psycopg://alice:***@db.example:5432/mlflow"
    assert redact(f"x uri=http://bob:{SECRET}@host:5000/ y") == "x uri=http://bob:***@host:5000/ y"
    for plain in (
        "sqlite:///mlflow.db",
        "http://127.0.0.1:5000/#/experiments/1/runs/abc",
        "postgresql://alice@/mlflow?host=/run/postgresql",
        "postgresql://alice:@db/mlflow",
        "naive-permuted_digits-s0",
    ):
        assert redact(plain) == plain


def test_nothing_recorded_or_printed_shows_the_password(tmp_path):
    uri = store_uri(tmp_path)
    config = {"seed": 0, "tracking": {"uri": TEAM, "experiment": "e"}, "method": {"lr": 0.1}}
    tracker = RunTracker(uri, "e")
    run_id = tracker.start("run", {"kind": "experiment", "origin": TEAM}, flatten(config))
    tracker.log_text(yaml.safe_dump(config), "config.yaml")
    tracker.log_json({"store": TEAM}, "summary.json")
    tracker.set_tags({"store": TEAM})
    tracker.describe(f"Logged into `{TEAM}`")
    tracker.finish()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["tracking.uri"] == redact(TEAM)
    assert run.data.params["method.lr"] == "0.1"
    recorded = [*run.data.params.values(), *run.data.tags.values()]
    for name in ("config.yaml", "summary.json"):
        recorded.append(Path(client.download_artifacts(run_id, name, str(tmp_path))).read_text())
    assert all(SECRET not in text for text in recorded)
    assert "alice:***@db.example" in Path(tmp_path / "config.yaml").read_text()
    assert SECRET not in ui_hint(TEAM, "1", run_id)
    assert SECRET not in ui_hint(f"https://bob:{SECRET}@mlflow.example.org", "1", run_id)


def test_a_table_logged_again_replaces_the_first(tmp_path, monkeypatch):
    uri = store_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # load_table searches the global store
    tracker = RunTracker(uri, "e")
    run_id = tracker.start("run", {}, {})
    table = {"trained_on": [0, 1, 1], "evaluated_on": [0, 0, 1], "accuracy": [0.9, 0.8, 0.95]}
    for _ in range(2):  # the final logging, then again after a resume
        tracker.log_table(table, "accuracy_table.json")
        tracker.log_table({"a": [1]}, "tables/other.json")
    client = MlflowClient(uri)
    local = client.download_artifacts(run_id, "accuracy_table.json", str(tmp_path))
    stored = json.loads(Path(local).read_text())
    assert stored["columns"] == ["trained_on", "evaluated_on", "accuracy"]
    assert stored["data"] == [[0, 0, 0.9], [1, 0, 0.8], [1, 1, 0.95]]
    listed = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert listed == [
        {"path": "accuracy_table.json", "type": "table"},
        {"path": "tables/other.json", "type": "table"},
    ]
    # The format MLflow's own log_table writes: its load_table reads it back.
    experiment_id = client.get_run(run_id).info.experiment_id
    loaded = client.load_table(experiment_id, "accuracy_table.json", [run_id])
    assert loaded["accuracy"].tolist() == pytest.approx([0.9, 0.8, 0.95])


# What a run of a parallel sweep raised when another run inserted the same dataset row between
# MLflow's look-up and its insert (study routing_lm_long, 2026-12-04).
RACE = (
    "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, "
    "datasets.digest"
)
INPUT = {"name": "text_domains/english", "digest": "249c0f68", "source_type": "text_domain"}


def test_dataset_inputs_survive_the_sweep_race_and_other_errors_still_raise(tmp_path):
    from mlflow.exceptions import MlflowException

    uri = store_uri(tmp_path)
    first, second = RunTracker(uri, "e"), RunTracker(uri, "e")
    first.start("first", {}, {})
    second.start("second", {}, {})
    first.log_inputs([{**INPUT, "source": "{}"}])  # the winner's row now exists
    real, calls = second.client.log_inputs, []

    def loses_the_race_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise MlflowException(RACE)
        return real(*args, **kwargs)

    second.client.log_inputs = loses_the_race_once
    second.log_inputs([{**INPUT, "source": "{}"}])
    assert len(calls) == 2
    for tracker in (first, second):
        inputs = MlflowClient(uri).get_run(tracker.run_id).inputs.dataset_inputs
        assert [d.dataset.name for d in inputs] == [INPUT["name"]]

    def fails(*args, **kwargs):
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run gone")

    second.client.log_inputs = fails
    with pytest.raises(MlflowException, match="run gone"):
        second.log_inputs([{**INPUT, "source": "{}"}])


def test_a_run_that_fails_while_it_starts_ends_failed_not_running(tmp_path):
    from mlflow.exceptions import MlflowException
    from omegaconf import OmegaConf

    from lifelong_moe import names
    from lifelong_moe.tracking.recorder import RunRecorder

    uri = store_uri(tmp_path)
    tracker = RunTracker(uri, "e")
    cfg = OmegaConf.create({"seed": 0, "tracking": {"run_name": None}, "benchmark": {}})

    def disk_full(*args, **kwargs):
        raise MlflowException("disk full")

    tracker.log_text = disk_full
    tags = {
        names.TAG_METHOD: "naive",
        names.TAG_BENCHMARK: "split_digits",
        names.TAG_MODEL: "mlp",
        names.TAG_SEED: "0",
    }
    with pytest.raises(MlflowException, match="disk full"):
        RunRecorder(tracker, cfg).start([], tags, tmp_path)
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FAILED"
