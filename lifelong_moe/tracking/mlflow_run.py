"""Writing one experiment run: ``RunTracker`` (rank 0) and ``SilentTracker`` (other ranks).

Run = one (method, benchmark, seed). Params: the flattened resolved config. Tags, metric and
artifact names: :mod:`lifelong_moe.names`. Metrics use step = experience index, so
curves from successive Trainers never overlap. Reads go through
:mod:`lifelong_moe.tracking.queries`, the client and the store check through
:mod:`lifelong_moe.tracking.store`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import posixpath
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from lifelong_moe import compat, names
from lifelong_moe.tracking import queries, store
from lifelong_moe.tracking.store import redact

LIBRARIES = ("torch", "lightning", "avalanche-lib", "hydra-core", "mlflow", "torchmetrics")


# ``scheme://user:password@``: the password part of any URL (postgresql://, http://, ...).
def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"method": {"lr": 0.1}}`` -> ``{"method.lr": "0.1"}`` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def git_commit() -> str:
    """The commit of the lifelong-moe checkout that ran, with ``-dirty`` when it has local edits."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if commit and dirty else commit or "unknown"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[names.tag_version(name)] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[names.tag_version(name)] = "missing"
    return versions


class RunTracker:
    """Writes one run: params once, metrics per experience, artifacts at the end."""

    writes = True

    def __init__(self, uri: str, experiment: str, run_id: str | None = None) -> None:
        self.uri = uri
        self.client = store.client(uri)
        self.experiment_id = store.open_experiment(self.client, uri, experiment)
        self.run_id = run_id

    def start(self, run_name: str | None, tags: dict[str, str], params: dict[str, str]) -> str:
        tags = {k: redact(str(v)) for k, v in tags.items()}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, redact(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        return self.run_id

    def sweep_parent(self, sweep_id: str) -> str | None:
        """The run that holds this sweep's runs (kind=sweep), or None when there is none.

        The sweep's launching process creates it before any job starts
        (:mod:`lifelong_moe.tracking.sweep`), so jobs only look it up: no race between jobs.
        """
        return queries.sweep_parent(self.client, self.experiment_id, sweep_id)

    def reopen(self, run_id: str) -> None:
        """Continue an existing run (resume): it is RUNNING again until finish()."""
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")

    def log_missing_rows(self, rows: list[Mapping[str, float]]) -> None:
        """Resume: log the rows (step = index) that did not reach MLflow before a crash."""
        logged = queries.logged_steps(self.client, self.run_id, names.ACC_SEEN)
        for step, row in enumerate(rows):
            if step not in logged:
                self.log_metrics(row, step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def log_points(self, points: Sequence[tuple[str, int, float]]) -> None:
        """Curve points (name, step, value), each at its own step, in as few calls as fit."""
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, step, v in points]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        batch = [RunTag(k, redact(str(v))) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=batch)

    def log_json(self, data: Any, name: str) -> None:
        self.log_text(json.dumps(data, indent=2), name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, redact(text), name)

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_table(self, table: Mapping[str, list], name: str) -> None:
        """A table artifact that the UI's evaluation view lists (``name`` ends in .json).

        Written whole, replacing an earlier one: ``MlflowClient.log_table`` appends to a table
        that exists, so a run resumed after its final tables were logged would list every row
        twice. Same file format and ``mlflow.loggedArtifacts`` entry as ``log_table``.
        """
        import pandas as pd
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        folder, file = posixpath.split(name)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / file
            frame = pd.DataFrame(dict(table))
            frame.to_json(path, orient="split", index=False, date_format="iso")
            self.client.log_artifact(self.run_id, str(path), folder or None)
        tags = self.client.get_run(self.run_id).data.tags
        listed = json.loads(tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": name, "type": "table"}
        if entry not in listed:
            self.set_tags({MLFLOW_LOGGED_ARTIFACTS: json.dumps([*listed, entry])})

    def describe(self, markdown: str) -> None:
        """The run's description on its page in the UI (the ``mlflow.note.content`` tag)."""
        self.set_tags({names.TAG_DESCRIPTION: markdown})

    def log_inputs(self, inputs: list[Mapping[str, str]]) -> None:
        """Attach datasets (name, digest, source_type, source, profile, context) to the run."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        datasets = [
            DatasetInput(
                Dataset(
                    d["name"], d["digest"], d["source_type"], d["source"], profile=d.get("profile")
                ),
                [InputTag(MLFLOW_DATASET_CONTEXT, d.get("context", "train"))],
            )
            for d in inputs
        ]
        # MLflow looks a dataset up, then inserts it: runs of one sweep that start together
        # race, and the loser fails on the UNIQUE constraint of (experiment, name, digest).
        # On sqlite the store lock serialises them; elsewhere the loser retries once, when the
        # winner's row exists.
        with store.store_lock(self.uri):
            try:
                self.client.log_inputs(self.run_id, datasets=datasets)
            except MlflowException as error:
                if "unique" not in str(error).lower():
                    raise
                self.client.log_inputs(self.run_id, datasets=datasets)

    def delete_artifacts(self, path: str) -> None:
        """Remove an artifact file or folder (local, mlflow-artifacts over HTTP, object stores)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        uri = self.client.get_run(self.run_id).info.artifact_uri
        get_artifact_repository(uri, tracking_uri=self.uri).delete_artifacts(path)

    def start_system_metrics(self, interval_s: float, resume: bool = False) -> None:
        """CPU, memory, disk, network (and GPU where present) as ``system/*`` metrics.

        MLflow's monitor samples every ``interval_s`` in a thread; it is given this run and
        store explicitly because the tracker never sets MLflow's active run.
        """
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no INFO chatter
        self.monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=self.uri
        )
        self.monitor.start()

    def stop_system_metrics(self) -> None:
        """Stop sampling; a run shorter than one interval still gets one sample of each."""
        monitor, self.monitor = getattr(self, "monitor", None), None
        if monitor is None:
            return
        monitor.finish()
        # The monitor publishes only after a full interval.
        if not compat.monitor_has_published(monitor):
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def ui_command(self) -> str:
        """How to look at this run: the URL, after ``mlflow ui`` where the store has no server."""
        return store.ui_hint(self.uri, self.experiment_id, self.run_id)


class SilentTracker(RunTracker):
    """What ranks other than 0 get on a multi-node run: they train and evaluate, never write."""

    writes = False

    def __init__(self, uri: str, experiment: str, run_id: str | None = None) -> None:
        self.uri, self.run_id = uri, run_id

    def start(self, run_name: str | None, tags: dict[str, str], params: dict[str, str]) -> str:
        self.run_id = f"rank-{global_rank()}"
        return self.run_id

    def reopen(self, run_id: str) -> None:
        self.run_id = run_id

    def sweep_parent(self, sweep_id: str) -> str | None:
        return None

    def log_missing_rows(self, rows: list[Mapping[str, float]]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_points(self, points: Sequence[tuple[str, int, float]]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_json(self, data: Any, name: str) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        pass

    def log_table(self, table: Mapping[str, list], name: str) -> None:
        pass

    def describe(self, markdown: str) -> None:
        pass

    def log_inputs(self, inputs: list[Mapping[str, str]]) -> None:
        pass

    def delete_artifacts(self, path: str) -> None:
        pass

    def start_system_metrics(self, interval_s: float, resume: bool = False) -> None:
        pass

    def stop_system_metrics(self) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def global_rank() -> int:
    """This process's rank when a cluster started several (torchrun: RANK, SLURM: SLURM_PROCID)."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def tracker_for_rank(uri: str, experiment: str) -> RunTracker:
    return RunTracker(uri, experiment) if global_rank() == 0 else SilentTracker(uri, experiment)
