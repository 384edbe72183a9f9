"""Tracking stores as users run them: a real `mlflow server` over HTTP, and parallel writers.

Both tests run the real CLI. The server listens on 127.0.0.1 only and is always stopped, with
its child processes, by the fixture's finalizer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import FAST, cli, run_cli, runs, store_uri
from tests.test_sweep_parent import MODE, PROBE, SMALL, SWEEP, check_parent, check_table

pytestmark = pytest.mark.slow

T = 2  # experiences per run: enough for a forgetting value, small enough for seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server's whole process group (uvicorn runs in a child process)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer within {limit_s:.0f} s:\n{log.read_text()}")


@pytest.fixture
def mlflow_server(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, Path]:
    """A fresh ``mlflow server`` (sqlite backend, proxied artifacts); yields (url, artifact dir)."""
    root = tmp_path / "server"
    artifacts = root / "artifacts"
    artifacts.mkdir(parents=True)
    port = free_port()
    log = root / "server.log"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host=127.0.0.1",
        f"--port={port}",
        "--workers=1",
        f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}",
        # Clients send artifacts to the server (mlflow-artifacts:/), which writes them here.
        "--serve-artifacts",
        f"--artifacts-destination={artifacts}",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    request.addfinalizer(lambda: stop(proc))
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, url, log)
    return url, artifacts


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_run_logs_through_a_tracking_server(workdir, mlflow_server):
    url, artifacts = mlflow_server
    result = run_cli(workdir, f"tracking.uri={url}", f"benchmark.n_experiences={T}", *FAST)

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("lifelong-moe")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert f"See this run: {url}/#/experiments/{experiment.experiment_id}/runs/{run_id}{MODE}" in (
        result.stdout
    )
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "naive" and run.data.tags["benchmark"] == "split_digits"
    assert run.data.params["benchmark.n_experiences"] == str(T)
    assert run.data.params["tracking.uri"] == url

    matrix = json.loads(Path(client.download_artifacts(run_id, "accuracy_matrix.json")).read_text())
    assert len(matrix["R"]) == T and all(len(row) == T for row in matrix["R"])
    for j in range(T):
        logged = history(client, run_id, f"acc/exp_{j}")
        assert logged == pytest.approx({i: matrix["R"][i][j] for i in range(T)})
    assert set(history(client, run_id, "acc/forgetting")) == set(range(T))
    assert "acc/final" in run.data.metrics and "acc/fwt" in run.data.metrics

    # The artifacts went through the server's proxy into its destination, not to a local path.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = {p.name for p in artifacts.rglob("*") if p.is_file()}
    assert {"config.yaml", "accuracy_matrix.json", "summary.json", "accuracy.json"} <= stored
    assert "state.pt" not in stored  # the resume state was deleted through the server at the end
    assert run.data.tags["mlflow.note.content"] and run.inputs.dataset_inputs
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert not (workdir / "mlruns").exists() and not (workdir / "mlflow.db").exists()


def test_four_runs_in_parallel_share_one_sqlite_store(workdir):
    uri = store_uri(workdir)  # fresh: its creation is serialised by a file lock
    args = [f"tracking.uri={uri}", f"benchmark.n_experiences={T}", *FAST, "trainer.max_epochs=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    jobs = []
    for seed in range(4):
        job = workdir / f"job{seed}"  # own cwd: Hydra output dirs are per second
        job.mkdir()
        with open(job / "out.txt", "w") as out, open(job / "err.txt", "w") as err:
            command = [*cli("lifelong-moe", "lifelong_moe.cli"), *args, f"seed={seed}"]
            jobs.append((job, subprocess.Popen(command, cwd=job, stdout=out, stderr=err, env=env)))
    try:
        for job, proc in jobs:
            code = proc.wait(timeout=300)
            assert code == 0, f"{job.name} exited {code}:\n{(job / 'err.txt').read_text()}"
    finally:
        for _, proc in jobs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    found = runs(uri)
    assert sorted(r.data.tags["seed"] for r in found) == ["0", "1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in found)
    assert len({frozenset(r.data.metrics) for r in found}) == 1
    client = MlflowClient(uri)
    for run in found:
        for j in range(T):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, f"acc/exp_{j}")]
            assert sorted(steps) == list(range(T)), (run.data.tags["seed"], j, steps)
        assert "accuracy_matrix.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def rest(url: str, path: str, body: dict | None = None) -> dict:
    """One call to the server's REST API (what the UI reads), GET or POST."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_parallel_sweep_through_a_server_has_one_parent(workdir, mlflow_server):
    """Two jobs at once on http: one parent (created before them), holding the comparison."""
    url, _ = mlflow_server
    result = run_cli(
        workdir,
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        PROBE,
        *SWEEP,
        *SMALL,
        f"tracking.uri={url}",
    )
    parent, children = check_parent(url)
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.runs_finished"] == "4/4"
    check_table(url, parent, children)
    probes = [json.loads(p.read_text()) for p in workdir.glob("multirun/*/*/probe_*.json")]
    assert len(probes) == 4 and all(p["parent"] == "RUNNING" for p in probes)

    # What the UI sees, through the REST API: the experiment opens on runs; one parent.
    experiment = rest(url, "experiments/get-by-name?experiment_name=lifelong-moe")["experiment"]
    tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    found = rest(
        url,
        "runs/search",
        {"experiment_ids": [experiment["experiment_id"]], "filter": "tags.kind = 'sweep'"},
    )["runs"]
    assert [r["info"]["run_id"] for r in found] == [parent.info.run_id]
    link = f"{url}/#/experiments/{experiment['experiment_id']}/runs/{parent.info.run_id}{MODE}"
    assert f"See the sweep (its comparison): {link}" in result.stdout
