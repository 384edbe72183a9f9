"""A run killed mid-stream resumes in the same MLflow run and ends bit-identical to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lifelong_moe import names
from tests.conftest import artifact_json, run_cli, runs, store_uri

pytestmark = pytest.mark.slow
ARGS = [
    "method=lifelong_moe",
    "benchmark=permuted_digits",
    "trainer.max_epochs=3",
    "trainer.progress_bar=false",
    "tracking.log_checkpoints=false",
    "seed=7",
]


def state_files(uri: str, run_id: str) -> list[str]:
    return [a.path for a in MlflowClient(uri).list_artifacts(run_id, names.RESUME_FOLDER)]


def test_same_seed_same_R_bit_for_bit(workdir):
    uri = store_uri(workdir)
    for keep in ("false", "true"):
        run_cli(workdir, f"tracking.uri={uri}", *ARGS, f"tracking.keep_resume_state={keep}")
    first, second = runs(uri)
    # The resume state is deleted once a run FINISHED, unless the user keeps it.
    assert state_files(uri, first.info.run_id) == []
    assert state_files(uri, second.info.run_id) == [names.RESUME_STATE]
    R1 = artifact_json(uri, first.info.run_id, "accuracy_matrix.json")["R"]
    R2 = artifact_json(uri, second.info.run_id, "accuracy_matrix.json")["R"]
    assert R1 == R2
    tags = first.data.tags
    assert tags["git_commit"] and tags["version.torch"].startswith("2.")


def test_sigkill_then_resume_matches_uninterrupted(workdir, monkeypatch):
    reference_uri = store_uri(workdir / "reference")
    (workdir / "reference").mkdir()
    run_cli(workdir, f"tracking.uri={reference_uri}", *ARGS)
    (reference,) = runs(reference_uri)
    expected = artifact_json(reference_uri, reference.info.run_id, "accuracy_matrix.json")

    uri = store_uri(workdir)
    # kill -9 at a named point early in experience 3 (never by timing: a kill that happened to
    # follow an epoch-end checkpoint would resume through the README's known inexact case)
    monkeypatch.setenv("LIFELONG_MOE_SIGNAL_AT", "train_step:3:3=SIGKILL")
    killed_run = run_cli(workdir, f"tracking.uri={uri}", *ARGS, check=False)
    monkeypatch.delenv("LIFELONG_MOE_SIGNAL_AT")
    assert killed_run.returncode == -9, killed_run.stderr[-2000:]
    (killed,) = runs(uri)
    assert killed.info.status == "RUNNING"  # SIGKILL leaves no chance to mark it

    result = run_cli(workdir, f"tracking.uri={uri}", "resume=last")
    assert "resuming run" in result.stdout
    (resumed,) = runs(uri)
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    got = artifact_json(uri, resumed.info.run_id, "accuracy_matrix.json")
    assert got["R"] == expected["R"] and got["b"] == expected["b"]
    client = MlflowClient(uri)
    for key in ("acc/seen", "acc/forgetting", "acc/exp_0", "cost/params_total"):
        steps = [m.step for m in client.get_metric_history(resumed.info.run_id, key)]
        assert sorted(steps) == list(range(5)), (key, steps)
    for key in ("acc/final", "acc/forgetting", "acc/bwt", "acc/fwt"):
        assert resumed.data.metrics[key] == reference.data.metrics[key]


def test_ctrl_c_marks_killed_and_stays_resumable(workdir, monkeypatch):
    """Ctrl-C inside experience 3, at a named step (no timing): KILLED, exit 130, one line."""
    monkeypatch.setenv("LIFELONG_MOE_SIGNAL_AT", "train_step:3:10=SIGINT")
    uri = store_uri(workdir)
    done = run_cli(workdir, f"tracking.uri={uri}", *ARGS, check=False)
    assert done.returncode == 130 and "Traceback" not in done.stderr
    (run,) = runs(uri)
    assert run.info.status == "KILLED"
    assert f"resume={run.info.run_id}" in done.stderr
    assert state_files(uri, run.info.run_id) == [names.RESUME_STATE]  # kept to resume from
    monkeypatch.delenv("LIFELONG_MOE_SIGNAL_AT")
    run_cli(workdir, f"tracking.uri={uri}", f"resume={run.info.run_id}")
    (run,) = runs(uri)
    assert run.info.status == "FINISHED"
    assert state_files(uri, run.info.run_id) == []


def test_a_checkpoint_with_another_expert_count_is_refused_untouched(workdir, monkeypatch):
    """A resume whose stored config grows another expert count than its resume state holds
    (here model.n_experts edited in the stored config.yaml): one line, exit 2, nothing written."""
    from omegaconf import OmegaConf

    from tests.conftest import TINY_RUN

    uri = store_uri(workdir)
    monkeypatch.setenv("LIFELONG_MOE_SIGNAL_AT", "train_step:1:1=SIGINT")
    done = run_cli(workdir, f"tracking.uri={uri}", *TINY_RUN, "method=lifelong_moe", check=False)
    monkeypatch.delenv("LIFELONG_MOE_SIGNAL_AT")
    assert done.returncode == 130, done.stderr[-2000:]
    (before,) = runs(uri)
    run_id = before.info.run_id
    artifacts = Path(before.info.artifact_uri.removeprefix("file://"))
    stored = OmegaConf.load(artifacts / names.CONFIG)
    assert stored.model.n_experts == 4
    stored.model.n_experts = 6
    OmegaConf.save(stored, artifacts / names.CONFIG)
    files = {p: p.read_bytes() for p in sorted(artifacts.rglob("*")) if p.is_file()}

    # the console script's own environment: tracking/store.py turns MLflow's download bars off
    # at import, which the forked test CLI (tests/cli_process.py) replaces by the parent's
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    done = run_cli(workdir, f"tracking.uri={uri}", f"resume={run_id}", check=False, extra_env=quiet)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line == (
        f"error: resume={run_id}: MoE layer ffns.0 of the checkpoint has 4 experts, "
        "expected 6 from the config after 1 experience(s)"
    )
    (after,) = runs(uri)
    assert after.info.status == before.info.status == "KILLED"
    assert after.info.end_time == before.info.end_time
    assert after.data.metrics == pytest.approx(before.data.metrics, nan_ok=True, rel=0, abs=0)
    assert (after.data.params, after.data.tags) == (before.data.params, before.data.tags)
    assert {p: p.read_bytes() for p in sorted(artifacts.rglob("*")) if p.is_file()} == files
