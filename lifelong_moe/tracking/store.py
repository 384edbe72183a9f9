"""The tracking store: the one place that opens an MlflowClient, checks a store, creates experiments.

Everything that reads or writes MLflow gets its client from :func:`client`; :func:`check_store`
is the one check that a store can be used (``must_exist`` for readers such as compare, which
must not create an empty store by opening a path with a typo). The URL helpers say how to look
at a run in the UI.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.tracking import MlflowClient

from lifelong_moe import names
from lifelong_moe.errors import ConfigError

URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^\s@]+@")


def redact(text: str) -> str:
    """``text`` with every password in a URL shown as ``***`` (as SQLAlchemy hides it).

    Applied to everything a run records or prints (params, tags, description, config.yaml,
    URLs): a ``postgresql://user:secret@host/db`` tracking URI must not end up in the store.
    """
    return URL_PASSWORD.sub(r"\g<head>***@", text)


# MLflow's notes on creating a fresh sqlite store, and its download progress bars (resume reads
# the state back), are not results: whoever opens a store first (a run, a sweep's parent) is quiet.
logging.getLogger("mlflow.store.db.utils").addFilter(
    lambda record: (
        not record.getMessage().startswith(
            ("Creating initial MLflow database tables", "Updating database tables")
        )
    )
)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def client(uri: str) -> MlflowClient:
    """A client bound to ``uri`` (never MLflow's process-wide tracking URI).

    Opening a sqlite store creates or migrates its schema: under ``store_lock``, so that the
    parallel jobs of a sweep never migrate one file at once.
    """
    with store_lock(uri):
        return MlflowClient(uri)


# Where `mlflow ui` serves by default: the URL printed for stores that have no server of their own.
LOCAL_UI = "http://127.0.0.1:5000"
# The UI's own switch between its GenAI and model-training views (a fresh browser starts on
# GenAI, whatever the experiment's tag): the query in the URL selects model training.
UI_MODE = "?workflowType=machine_learning"


def mark_experiment(mlflow_client: MlflowClient, experiment_id: str) -> None:
    """Make the MLflow UI open the experiment on its runs (model training), not on traces."""
    mlflow_client.set_experiment_tag(
        experiment_id, names.TAG_EXPERIMENT_KIND, names.MODEL_DEVELOPMENT
    )


def create_experiment(mlflow_client: MlflowClient, name: str) -> str:
    """Create the experiment (marked for model training); a parallel creator may win the race."""
    try:
        return mlflow_client.create_experiment(
            name, tags={names.TAG_EXPERIMENT_KIND: names.MODEL_DEVELOPMENT}
        )
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel run
        return mlflow_client.get_experiment_by_name(name).experiment_id


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


def is_local(uri: str) -> bool:
    """A store on this machine (sqlite or file): one a resume may trust with code (pickles,
    ``_target_`` classes outside the toolkit); a server's store anyone with write access fills."""
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def check_store(uri: str, must_exist: bool = False) -> None:
    """Fail in one line, before any work, when the tracking store cannot be used.

    Writers (a run) may create a sqlite store; readers (compare) pass ``must_exist``, since
    opening a mistyped path would silently create an empty store.
    """
    scheme = urlparse(uri).scheme
    if must_exist:
        _check_exists(uri)
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
            client(uri).search_experiments(max_results=1)
        except Exception as error:  # any transport or server error means: cannot track
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(
                f"tracking.uri={redact(uri)} is not reachable ({redact(first[:200])}); start it with "
                "`mlflow server` or choose another tracking.uri"
            ) from None


def _check_exists(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ConfigError(f"no MLflow store at {uri} ({path} does not exist)")
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(uri.removeprefix("file://").removeprefix("file:"))
        if not path.is_dir():
            raise ConfigError(f"no MLflow store at {uri} ({path} is not a folder)")


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
    once break the migration. Later writes are ordinary sqlite transactions and need no lock,
    except MLflow's look-up-then-insert of dataset rows (``RunTracker.log_inputs``).
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


def open_experiment(mlflow_client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment ``name``, created (and marked for model training) if it is new."""
    with store_lock(uri):
        found = mlflow_client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else create_experiment(mlflow_client, name)
        if found is None or found.tags.get(names.TAG_EXPERIMENT_KIND) != names.MODEL_DEVELOPMENT:
            mark_experiment(mlflow_client, experiment_id)
    return experiment_id
