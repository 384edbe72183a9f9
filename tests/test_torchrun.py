"""Every process runs the loop, started by torchrun: 2 CPU processes (gloo) against one.

At the same global batch (one process: 128; two: 64 each) and seed, the first optimizer step's
loss and gradients are one process's within fp32 tolerance (``lambda_aux=0``: the balance loss
is not linear in the batch), the accuracy matrix is within 0.01, and only rank 0 writes to MLflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lifelong_moe.models.checkpoint import load_model
from tests.conftest import TINY_RUN, artifact_json, benchmark_from_yaml, run_cli, runs, store_uri

pytestmark = pytest.mark.slow
PROBE = [
    *TINY_RUN,
    "method=lifelong_moe",
    "method._target_=tests.first_step_probe.FirstStepProbe",
    "method.lambda_aux=0",
    "tracking.log_checkpoints=true",
]


def torchrun(cwd: Path, nproc: int, *args: str, env: dict[str, str] | None = None):
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m lifelong_moe.cli``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(nproc), "-m", "lifelong_moe.cli", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, env=environment, timeout=600
    )


def predictions(uri: str, run_id: str, i: int) -> torch.Tensor:
    from mlflow.tracking import MlflowClient

    path = MlflowClient(uri).download_artifacts(run_id, f"checkpoints/model_exp_{i}.pt")
    model = load_model(path).eval()
    stream = benchmark_from_yaml("split_digits", n_experiences=2)
    with torch.no_grad():
        return torch.cat([model(exp.test[:][0])[0].argmax(-1) for exp in stream.experiences])


def test_devices_without_a_launcher_print_the_torchrun_command(workdir):
    uri = store_uri(workdir)
    done = run_cli(workdir, f"tracking.uri={uri}", *TINY_RUN, "trainer.devices=2", check=False)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: trainer.devices=2 needs one process per device")
    assert "run: torchrun --nproc-per-node 2 -m lifelong_moe.cli " in line
    assert "trainer.devices=2" in line
    assert runs(uri) == []


def test_two_processes_under_torchrun_match_one(workdir):
    found = {}
    for nproc, batch in ((1, 128), (2, 64)):
        folder = workdir / str(nproc)
        (folder / "probe").mkdir(parents=True)
        uri = store_uri(folder)
        args = [f"tracking.uri={uri}", *PROBE, f"trainer.batch_size={batch}"]
        env = {"FIRST_STEP_PROBE": str(folder / "probe")}
        if nproc == 1:
            run_cli(folder, *args, extra_env=env)
        else:
            done = torchrun(folder, nproc, *args, env=env)
            assert done.returncode == 0, done.stderr[-3000:]
            assert done.stdout.count("See this run") == 1  # rank 0 speaks for both
        (run,) = runs(uri)  # one run: rank 1 wrote nothing
        assert run.info.status == "FINISHED"
        probes = [torch.load(p) for p in sorted((folder / "probe").glob("rank*.pt"))]
        assert len(probes) == nproc
        found[nproc] = {
            "R": artifact_json(uri, run.info.run_id, "accuracy_matrix.json"),
            "loss": sum(p["loss"] for p in probes) / nproc,  # each rank's mean over its half
            "grads": probes[0]["grads"],
            "pred": predictions(uri, run.info.run_id, 1),
        }
    one, two = found[1], found[2]
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6)
    assert two["grads"].keys() == one["grads"].keys()
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert two["R"]["b"] == one["R"]["b"]  # the untrained model: sharded evaluation is exact
    for row_two, row_one in zip(two["R"]["R"], one["R"]["R"], strict=True):
        assert row_two == pytest.approx(row_one, abs=0.01)
    differ = int((two["pred"] != one["pred"]).sum())
    print(f"test predictions that differ after the last experience: {differ} of {len(one['pred'])}")
    assert differ <= 0.01 * len(one["pred"])
