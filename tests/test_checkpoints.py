"""kill -9 inside an experience, resume: the run ends bit-identical to an uninterrupted one.

The kills land at named points (``LIFELONG_MOE_SIGNAL_AT``), never by timing: mid-epoch (in the
first and in the last epoch), just after an epoch-end checkpoint, and during evaluation once
training of the experience is done.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from lifelong_moe import names
from lifelong_moe.run.checkpoints import checkpoints
from tests.conftest import artifact_json, run_cli, runs, store_uri

pytestmark = pytest.mark.slow
# 20 steps per epoch (digits, batch 64), checkpoints every 5 steps and at epoch ends.
ARGS = [
    "method=lifelong_moe",
    "benchmark=permuted_digits",
    "model=moe_mlp",
    "model.d_model=32",
    "model.d_hidden=32",
    "trainer.max_epochs=2",
    "trainer.progress_bar=false",
    "checkpoint.every_n_steps=5",
    "tracking.log_checkpoints=false",
    "seed=3",
]


def run_until(cwd: Path, args: list[str], at: str) -> subprocess.CompletedProcess:
    """Run the CLI and SIGKILL it when it reaches the named point ``at``."""
    hook = {"LIFELONG_MOE_SIGNAL_AT": f"{at}=SIGKILL"}
    done = run_cli(cwd, *args, check=False, timeout=1800, extra_env=hook)
    assert done.returncode == -9, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    return done


def metric_steps(uri: str, run_id: str) -> dict[str, list[int]]:
    client = MlflowClient(uri)
    # System metrics are sampled by wall clock: how many there are depends on timing.
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in keys}


def train_losses(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """train/* (the last epoch's mean losses) of every experience: they depend on no clock."""
    client = MlflowClient(uri)
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith(names.train_term(""))]
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("reference")
    uri = store_uri(workdir)
    run_cli(workdir, f"tracking.uri={uri}", *ARGS)
    (run,) = runs(uri)
    matrix = artifact_json(uri, run.info.run_id, "accuracy_matrix.json")
    return {
        "matrix": matrix,
        "metrics": run.data.metrics,
        "steps": metric_steps(uri, run.info.run_id),
        "train": train_losses(uri, run.info.run_id),
    }


# Checkpoints are written in line on CPU; "async" cases write them in a background thread
# (checkpoint.background=true, the GPU default) and must end bit-identical all the same.
@pytest.mark.parametrize(
    ("at", "where", "writes"),
    [
        ("train_step:3:7", "at experience 3, epoch 0, step 5", "async"),
        ("train_step:3:23", "at experience 3, epoch 0, step 20", "in line"),
        # mid-epoch in the last epoch: train/* need the epoch's loss sums from the checkpoint
        ("train_step:3:27", "at experience 3, epoch 1, step 25", "in line"),
        ("evaluate:3", "at experience 3, epoch 1, step 40", "in line"),
        # killed while the writer thread wrote step 25's checkpoint, before it took its name
        ("checkpoint_write:3:25", "at experience 3, epoch 0, step 20", "async"),
    ],
)
def test_kill_inside_experience_then_resume_is_bit_identical(workdir, reference, at, where, writes):
    uri = store_uri(workdir)
    background = f"checkpoint.background={str(writes == 'async').lower()}"
    run_until(workdir, [f"tracking.uri={uri}", *ARGS, background], at)
    (killed,) = runs(uri)
    assert killed.info.status == "RUNNING"
    folder = Path(killed.data.tags["checkpoint_dir"])
    assert [p.name for p in folder.iterdir()], "no checkpoint was written"
    assert len(list(folder.glob("*.ckpt"))) <= 2  # checkpoint.keep
    newest = checkpoints(folder, experience=3)[-1]
    trained_before = torch.load(newest, weights_only=True)["lifelong_moe"]["train_s"]

    resumed = run_cli(workdir, f"tracking.uri={uri}", "resume=last")
    assert resumed.stdout.splitlines()[0] == f"resuming run {killed.info.run_id} {where}"
    (run,) = runs(uri)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    got = artifact_json(uri, run.info.run_id, "accuracy_matrix.json")
    assert got["R"] == reference["matrix"]["R"] and got["b"] == reference["matrix"]["b"]
    for key in (
        names.ACC_FINAL,
        names.ACC_FORGETTING,
        names.ACC_BWT,
        names.ACC_FWT,
        names.ACC_AVG_INCREMENTAL,
    ):
        assert run.data.metrics[key] == reference["metrics"][key], key
    # every step's metrics exactly once, the same keys and steps as the uninterrupted run
    assert metric_steps(uri, run.info.run_id) == reference["steps"]
    assert train_losses(uri, run.info.run_id) == reference["train"]
    assert not folder.exists(), "a finished run keeps no training checkpoints"
    # cost/train_s of the resumed experience counts its training before the kill too
    (train_s,) = [
        m.value
        for m in MlflowClient(uri).get_metric_history(run.info.run_id, names.COST_TRAIN_S)
        if m.step == 3
    ]
    assert train_s > trained_before > 0
