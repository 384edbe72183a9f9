"""Shared helpers: run the real CLI in a temp directory and read back what MLflow stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Triton reads TRITON_INTERPRET at its first import, which any test module (or the CLI in-process)
# may trigger: set it before everything, so that without a GPU the fused kernels run on the CPU
# under the interpreter in whatever order (or pytest-xdist worker) the tests run.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
# CLI subprocesses run in temporary folders and some tests name test-only classes
# (``method._target_=tests....``, Hydra callbacks): let them import ``tests`` from the checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)
FAST = ["trainer.max_epochs=2", "trainer.progress_bar=false", "tracking.log_checkpoints=false"]
# As small a whole run as there is: 2 experiences of 10 steps (split digits, batch 64), 1 epoch.
TINY_RUN = [
    "benchmark=split_digits",
    "benchmark.n_experiences=2",
    "model.d_model=32",
    "model.d_hidden=32",
    "trainer.max_epochs=1",
    "trainer.progress_bar=false",
    "tracking.log_checkpoints=false",
]


def cli(*names: str) -> list[str]:
    """The installed console script when present (what a user runs), else the module."""
    script = Path(sys.executable).parent / names[0]
    return [str(script)] if script.exists() else [sys.executable, "-m", names[1]]


def run_cli(
    cwd: Path,
    *args: str,
    check: bool = True,
    timeout: int = 600,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a process of its own: forked from a server that has
    imported it once (tests/cli_process.py), or, for sweeps on the joblib launcher (whose loky
    workers hang under a forked parent), the console script itself."""
    from tests import cli_process

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(extra_env or {})}
    if any("launcher=joblib" in a for a in args):
        result = subprocess.run(
            [*cli("lifelong-moe", "lifelong_moe.cli"), *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    else:
        result = cli_process.run(list(args), cwd, env, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"CLI failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def store_uri(path: Path) -> str:
    return f"sqlite:///{path / 'mlflow.db'}"


def runs(uri: str, experiment: str = "lifelong-moe", kind: str = "experiment") -> list:
    """The experiment's runs of one kind (sweeps add a parent run of kind 'sweep')."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id],
        f"tags.kind = '{kind}'",
        order_by=["attributes.start_time ASC"],
    )


def artifact_json(uri: str, run_id: str, name: str) -> dict:
    from mlflow.tracking import MlflowClient

    local = MlflowClient(uri).download_artifacts(run_id, name)
    return json.loads(Path(local).read_text())


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def benchmark_from_yaml(name: str, seed: int = 0, **overrides: object):
    """What the runner does with conf/benchmark/<name>.yaml: compose it with a top-level seed,
    apply overrides, and build it (``targets.instantiate`` drops ``name``)."""
    from omegaconf import OmegaConf

    from lifelong_moe.targets import instantiate

    conf = REPO / "conf" / "benchmark"
    cfg = OmegaConf.create({"seed": seed, "benchmark": OmegaConf.load(conf / f"{name}.yaml")})
    for key, value in overrides.items():
        cfg.benchmark[key] = value
    return instantiate(cfg.benchmark, "benchmark")
