"""SIGINT and SIGTERM at every kind of moment: one line, the right exit code, a KILLED run.

Each signal is sent by the run itself at a named point (``LIFELONG_MOE_SIGNAL_AT``), so what
is tested never depends on timing or machine load.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, cli, run_cli, runs, store_uri

pytestmark = pytest.mark.slow
ARGS = [*TINY_RUN, "checkpoint.every_n_steps=5"]


def run_signalled(
    cwd: Path, at: str, sig: str, *extra: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    uri = store_uri(cwd)
    return subprocess.run(
        [*cli("lifelong-moe", "lifelong_moe.cli"), f"tracking.uri={uri}", *ARGS, *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "LIFELONG_MOE_SIGNAL_AT": f"{at}={sig}"},
        timeout=600,
    )


def interrupted_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("interrupted")]


@pytest.mark.parametrize(
    ("at", "sig", "where"),
    [
        ("before_experience:1", "SIGTERM", "experience 1"),
        ("evaluate:0", "SIGINT", "experience 0 step 10"),
        ("after_experience:0", "SIGTERM", "experience 0 step 10"),
        ("log_metrics:0", "SIGINT", "experience 0 step 10"),
    ],
)
def test_signal_marks_killed_in_one_line(workdir, at, sig, where):
    done = run_signalled(workdir, at, sig)
    assert done.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (run,) = runs(store_uri(workdir))
    assert run.info.status == "KILLED"
    run_id = run.info.run_id
    assert interrupted_lines(done.stderr) == [
        f"interrupted: run {run_id} marked KILLED at {where}; continue with resume={run_id}"
    ]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_in_training_stops_at_that_step_with_a_checkpoint_and_resumes(workdir, sig):
    done = run_signalled(workdir, "train_step:0:7", sig)
    assert done.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (run,) = runs(store_uri(workdir))
    run_id = run.info.run_id
    assert run.info.status == "KILLED"
    assert interrupted_lines(done.stderr) == [
        f"interrupted: run {run_id} marked KILLED at experience 0 step 7; "
        f"continue with resume={run_id}"
    ]
    folder = Path(run.data.tags["checkpoint_dir"])
    assert "exp0-step7.ckpt" in {p.name for p in folder.iterdir()}
    resumed = run_cli(workdir, f"tracking.uri={store_uri(workdir)}", f"resume={run_id}")
    assert resumed.stdout.splitlines()[0].endswith("at experience 0, epoch 0, step 7")
    (run,) = runs(store_uri(workdir))
    assert run.info.status == "FINISHED"


def test_signal_during_startup_records_nothing(workdir):
    done = run_signalled(workdir, "startup", "SIGINT")
    assert done.returncode == 130
    assert "Traceback" not in done.stderr
    assert interrupted_lines(done.stderr) == [
        "interrupted (SIGINT) before the run started: nothing was recorded"
    ]
    assert runs(store_uri(workdir)) == []


def test_second_ctrl_c_exits_at_once_in_one_line(workdir):
    done = run_signalled(workdir, "train_step:0:3", "SIGINT,SIGINT")
    assert done.returncode == 130
    assert "Traceback" not in done.stderr
    (run,) = runs(store_uri(workdir))
    assert interrupted_lines(done.stderr) == [
        f"interrupted again (SIGINT): exiting now at experience 0 step 3; "
        f"continue with resume={run.info.run_id}"
    ]


def test_slurm_requeue_signal_checkpoints_requeues_and_resumes_the_same_run(workdir):
    """SIGUSR1 (SLURM's warning before preemption or the time limit) inside a SLURM job."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    calls = workdir / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = run_signalled(workdir, "train_step:0:3", "SIGUSR1", env=env)
    assert done.returncode == 128 + 10, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert calls.read_text().split() == ["requeue", "4242"]
    (run,) = runs(store_uri(workdir))
    assert run.info.status == "KILLED" and run.data.tags["slurm_job"] == "4242"

    # The requeued job runs the very same command: it continues its run from the checkpoint.
    again = subprocess.run(
        [*cli("lifelong-moe", "lifelong_moe.cli"), f"tracking.uri={store_uri(workdir)}", *ARGS],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0] == (
        f"resuming run {run.info.run_id} at experience 0, epoch 0, step 3"
    )
    (run,) = runs(store_uri(workdir))
    assert run.info.status == "FINISHED"
