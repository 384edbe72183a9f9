"""The MLflow layout of one experiment run, in one place (compare reads what this writes).

Run = one (method, benchmark, seed). Params: the flattened resolved config. Tags: method,
benchmark, model, seed, kind=experiment, matrix, git commit, library versions, sweep_id.
Metrics use step = experience index, so curves from successive Trainers never overlap.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.tracking import MlflowClient

from lifelong_moe.errors import ConfigError
from lifelong_moe.tracking import names

LIBRARIES = ("torch", "lightning", "avalanche-lib", "hydra-core", "mlflow", "torchmetrics")


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
            versions[f"version.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[f"version.{name}"] = "missing"
    return versions


def check_store(uri: str) -> None:
    """Fail before training, in one line, when the tracking store cannot be used."""
    scheme = urlparse(uri).scheme
    if scheme in ("", "file") and not MLFLOW_ALLOW_FILE_STORE.get():
        # MLflow 3 refuses its file store with a long multi-line exception at first use.
        raise ConfigError(
            f"tracking.uri={uri} is an MLflow file store, which MLflow 3 refuses; use "
            "tracking.uri=sqlite:///mlflow.db (or http://host:port), or set "
            "MLFLOW_ALLOW_FILE_STORE=true to keep the file store"
        )
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise ConfigError(f"tracking.uri={uri}: folder {folder} does not exist")
        # Try it: os.access answers yes to root even on read-only mounts.
        try:
            with tempfile.NamedTemporaryFile(dir=folder):
                pass
            if path.exists():
                with open(path, "r+b"):
                    pass
        except OSError:
            raise ConfigError(f"tracking.uri={uri}: {path} is not writable") from None
        return
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as error:  # any transport or server error means: cannot track
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(
                f"tracking.uri={uri} is not reachable ({first[:200]}); start it with "
                "`mlflow server` or choose another tracking.uri"
            ) from None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a sqlite store across processes (parallel sweep jobs).

    MLflow creates and migrates the schema on first connection; two processes doing that at
    once break the migration. Later writes are ordinary sqlite transactions and need no lock.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RunTracker:
    """Writes one run: params once, metrics per experience, artifacts at the end."""

    writes = True

    def __init__(self, uri: str, experiment: str, run_id: str | None = None) -> None:
        self.uri = uri
        with store_lock(uri):
            self.client = MlflowClient(uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                found.experiment_id if found else self._create_experiment(experiment)
            )
        self.run_id = run_id

    def _create_experiment(self, name: str) -> str:
        try:
            return self.client.create_experiment(name)
        except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel run
            return self.client.get_experiment_by_name(name).experiment_id

    def start(self, run_name: str | None, tags: dict[str, str], params: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        return self.run_id

    def sweep_parent(self, sweep_id: str) -> str:
        """The run that holds a sweep's runs (kind=sweep), created by the first job to ask.

        It is a container only, finished at once; parallel jobs on one sqlite store agree on it
        through the store lock.
        """
        with store_lock(self.uri):
            found = self.client.search_runs(
                [self.experiment_id],
                f"tags.kind = 'sweep' and tags.sweep_id = '{sweep_id}'",
                max_results=1,
            )
            if found:
                return found[0].info.run_id
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"sweep {sweep_id}",
                tags={"kind": "sweep", "sweep_id": sweep_id},
            )
            self.client.set_terminated(run.info.run_id, "FINISHED")
            return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Continue an existing run (resume): it is RUNNING again until finish()."""
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")

    def log_missing_rows(self, rows: list[Mapping[str, float]]) -> None:
        """Resume: log the rows (step = index) that did not reach MLflow before a crash."""
        history = self.client.get_metric_history(self.run_id, names.ACC_SEEN)
        logged = {m.step for m in history}
        for step, row in enumerate(rows):
            if step not in logged:
                self.log_metrics(row, step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_json(self, data: Any, name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2), name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def ui_command(self) -> str:
        """How to look at this run: a server already has a UI, a local store needs ``mlflow ui``."""
        if self.uri.startswith(("http://", "https://")):
            base = self.uri.rstrip("/")
            return f"open {base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"mlflow ui --backend-store-uri {self.uri}"


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

    def sweep_parent(self, sweep_id: str) -> str:
        return ""

    def log_missing_rows(self, rows: list[Mapping[str, float]]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_json(self, data: Any, name: str) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        pass

    def log_figure(self, figure: Any, name: str) -> None:
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
