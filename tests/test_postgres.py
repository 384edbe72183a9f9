"""A team store on PostgreSQL: a real server (pgserver bundles one), a parallel 2 x 2 sweep that
writes into it, lifelong-moe-compare reading it back, exactly one parent; and the one-line errors
for a missing driver or an unreachable server.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from lifelong_moe.errors import ConfigError
from lifelong_moe.tracking import store
from lifelong_moe.tracking.store import check_store
from tests.conftest import cli, run_cli
from tests.test_sweep_parent import SMALL, SWEEP, check_parent, check_table


@pytest.fixture
def postgres(tmp_path: Path) -> str:
    """A fresh PostgreSQL server on a Unix socket, stopped and deleted afterwards; its URI."""
    pgserver = pytest.importorskip("pgserver", reason="pgserver is in the dev extra")
    pytest.importorskip("psycopg", reason="psycopg is in the postgres extra")
    try:
        server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="delete")
    except Exception as error:  # no shared memory, no user to run as, ...
        pytest.skip(f"pgserver cannot start a PostgreSQL server here: {error}")
    yield server.get_uri()
    server.cleanup()


@pytest.mark.slow
def test_parallel_sweep_into_postgres_then_compare(workdir, postgres):
    check_store(postgres)  # reachable and writable before anything exists
    run_cli(
        workdir,
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *SWEEP,
        *SMALL,
        f"tracking.uri='{postgres}'",
    )
    parent, children = check_parent(postgres)
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert parent.info.status == "FINISHED"
    check_table(postgres, parent, children)

    compare = subprocess.run(
        [
            *cli("lifelong-moe-compare", "lifelong_moe.compare"),
            f"--tracking-uri={postgres}",
            "--format=json",
            f"--filter=sweep_id={parent.data.tags['sweep_id']}",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(compare.stdout)["rows"]
    assert sorted(r["method"] for r in rows) == ["joint", "naive"]
    assert all(r["n"] == 2 for r in rows)
    assert "The sweep's parent run holds this comparison" in compare.stderr


def test_missing_driver_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        store.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "psycopg" else real(name, *a),
    )
    with pytest.raises(ConfigError) as error:
        check_store("postgresql://alice:secret@db.example:5432/mlflow")
    message = str(error.value)
    assert "driver 'psycopg' is not installed" in message
    assert "pip install 'lifelong-moe[postgres]'" in message
    assert "secret" not in message and "\n" not in message


def test_unreachable_postgres_is_one_line_without_the_password(tmp_path):
    pytest.importorskip("psycopg", reason="psycopg is in the postgres extra")
    socket_dir = tmp_path / "nothing-listens-here"
    socket_dir.mkdir()
    with pytest.raises(ConfigError, match=r"is not reachable") as error:
        check_store(f"postgresql://alice:secret@/mlflow?host={socket_dir}")
    assert "secret" not in str(error.value) and "\n" not in str(error.value)
