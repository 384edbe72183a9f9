"""The MLflow layout of one experiment run, in one place (compare reads what this writes).

Run = one (method, benchmark, seed). Params: the flattened resolved config. Tags: method,
benchmark, model, seed, kind=experiment, matrix, git commit, library versions, sweep_id.
Metrics use step = experience index, so curves from successive Trainers never overlap.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import logging
import os
import posixpath
import re
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


# ``scheme://user:password@``: the password part of any URL (postgresql://, http://, ...).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^\s@]+@")


def redact(text: str) -> str:
    """``text`` with every password in a URL shown as ``***`` (as SQLAlchemy hides it).

    Applied to everything a run records or prints (params, tags, description, config.yaml,
    URLs): a ``postgresql://user:secret@host/db`` tracking URI must not end up in the store.
    """
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


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


# MLflow 3 opens an experiment in its GenAI view (traces) unless this tag says otherwise.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
# Where `mlflow ui` serves by default: the URL printed for stores that have no server of their own.
LOCAL_UI = "http://127.0.0.1:5000"
# The UI's own switch between its GenAI and model-training views (a fresh browser starts on
# GenAI, whatever the experiment's tag): the query in the URL selects model training.
UI_MODE = "?workflowType=machine_learning"


def mark_experiment(client: MlflowClient, experiment_id: str) -> None:
    """Make the MLflow UI open the experiment on its runs (model training), not on traces."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_DEVELOPMENT)


def create_experiment(client: MlflowClient, name: str) -> str:
    """Create the experiment (marked for model training); a parallel creator may win the race."""
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND: MODEL_DEVELOPMENT})
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel run
        return client.get_experiment_by_name(name).experiment_id


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The browser URL of a run (or of the experiment's run list when run_id is None).

    An http(s) tracking URI is a server with its own UI; any other store is served by
    ``mlflow ui`` on its default address.
    """
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    url = f"{base}/#/experiments/{experiment_id}/runs"
    return f"{url}/{run_id}{UI_MODE}" if run_id else f"{url}{UI_MODE}"


def ui_hint(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """One line that opens the run: the URL, preceded by the ``mlflow ui`` command if needed."""
    url = redact(ui_url(uri, experiment_id, run_id))
    if uri.startswith(("http://", "https://")):
        return url
    return f"mlflow ui --backend-store-uri {redact(uri)}   then open {url}"


def find_sweep_parent(client: MlflowClient, experiment_id: str, sweep_id: str) -> str | None:
    """The run id of a sweep's parent run (tags kind=sweep, sweep_id), None if it has none."""
    found = client.search_runs(
        [experiment_id],
        f"tags.kind = 'sweep' and tags.sweep_id = '{sweep_id}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def check_store(uri: str) -> None:
    """Fail before training, in one line, when the tracking store cannot be used."""
    scheme = urlparse(uri).scheme
    shown = redact(uri)
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
    if scheme.split("+")[0] in ("postgresql", "postgres"):
        check_postgres(uri)
        return
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as error:  # any transport or server error means: cannot track
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(
                f"tracking.uri={shown} is not reachable ({redact(first[:200])}); start it with "
                "`mlflow server` or choose another tracking.uri"
            ) from None


# SQLAlchemy driver name -> the module it imports (SQLAlchemy 2.1 defaults postgresql:// to psycopg).
POSTGRES_MODULES = {"psycopg": "psycopg", "psycopg2": "psycopg2", "pg8000": "pg8000"}
POSTGRES_EXTRA = (
    "pip install 'lifelong-moe[postgres]' (in a checkout: pip install -e '.[postgres]')"
)


def check_postgres(uri: str) -> None:
    """A PostgreSQL store: its driver is installed, the server answers, and we may write.

    Messages never show the password. Writable means: INSERT on MLflow's ``experiments`` table
    where the schema exists, else CREATE on the current schema (MLflow creates its tables).
    """
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    try:
        url = make_url(uri)
    except Exception:  # SQLAlchemy's ArgumentError and friends: the URL does not parse
        raise ConfigError(
            f"tracking.uri={redact(uri)}: expected postgresql://user@host:port/database"
        ) from None
    shown = url.render_as_string(hide_password=True)
    driver = url.get_driver_name()
    module = POSTGRES_MODULES.get(driver, driver)
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"tracking.uri={shown}: the PostgreSQL driver {module!r} is not installed; "
            f"install it with {POSTGRES_EXTRA}"
        )
    args = {"connect_timeout": 10} if module in ("psycopg", "psycopg2") else {}
    engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=args)
    probe = sqlalchemy.text(
        "SELECT CASE WHEN to_regclass('experiments') IS NULL "
        "THEN has_schema_privilege(current_schema(), 'CREATE') "
        "ELSE has_table_privilege('experiments', 'INSERT') END"
    )
    try:
        with engine.connect() as connection:
            writable = connection.execute(probe).scalar()
    except Exception as error:  # driver or server errors all mean: cannot track there
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"tracking.uri={shown} is not reachable ({redact(first[:200])}); start the database or "
            "choose another tracking.uri"
        ) from None
    finally:
        engine.dispose()
    if not writable:
        raise ConfigError(
            f"tracking.uri={shown}: user {url.username} may not write there (needs CREATE on "
            "the schema, or INSERT on MLflow's tables)"
        )


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
                found.experiment_id if found else create_experiment(self.client, experiment)
            )
            if found is None or found.tags.get(EXPERIMENT_KIND) != MODEL_DEVELOPMENT:
                mark_experiment(self.client, self.experiment_id)
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
        return find_sweep_parent(self.client, self.experiment_id, sweep_id)

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
        batch = [RunTag(k, redact(str(v))) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=batch)

    def log_json(self, data: Any, name: str) -> None:
        self.log_text(json.dumps(data, indent=2), name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, redact(text), name)

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

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
        # The monitor publishes only after a full interval; _logging_step counts what it sent.
        if monitor._logging_step == 0:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def ui_command(self) -> str:
        """How to look at this run: the URL, after ``mlflow ui`` where the store has no server."""
        return ui_hint(self.uri, self.experiment_id, self.run_id)


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
