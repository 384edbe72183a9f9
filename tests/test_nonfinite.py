"""A NaN or infinite loss stops the run: exit 1, one line naming experience and step, run FAILED,
and everything logged before it stays in MLflow."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from lifelong_moe.errors import NonFiniteLossError
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.methods.naive import Naive
from lifelong_moe.names import RESUME_FOLDER
from tests.conftest import FAST, REPO, run_cli, runs, store_uri


class Constant(nn.Module):
    """A 'model' whose logits are fixed: the loss is whatever they make it."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        return self.logits.expand(len(x), -1), []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_training_step_refuses_a_non_finite_loss(bad):
    method = ContinualMethod(Constant(torch.tensor([0.0, bad, 1.0])))
    method.experience = SimpleNamespace(index=3)
    batch = (torch.zeros(4, 2), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(NonFiniteLossError, match=r"experience 3, step 0"):
        method.training_step(batch, 0)


def test_training_step_passes_a_finite_loss():
    method = ContinualMethod(Constant(torch.zeros(3)))
    method.experience = SimpleNamespace(index=0)
    method.log = lambda *args, **kwargs: None  # no Trainer attached
    loss = method.training_step((torch.zeros(4, 2), torch.tensor([0, 1, 2, 0])), 0)
    assert torch.isfinite(loss)


class PoisonSecondExperience(Naive):
    """Test-only method (named by ``method._target_``): a weight turns infinite at experience 1,
    so the real loss of experience 1 becomes NaN after experience 0 was logged normally."""

    def before_experience(self, exp) -> None:
        super().before_experience(exp)
        if exp.index == 1:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def failed_run(uri: str):
    (run,) = runs(uri)
    assert run.info.status == "FAILED"
    names = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert "config.yaml" in names
    return run, names


@pytest.mark.slow
def test_huge_learning_rate_stops_the_run(workdir):
    uri = store_uri(workdir)
    args = [f"tracking.uri={uri}", "benchmark.n_experiences=2", *FAST, "method.lr=1e30"]
    result = run_cli(workdir, *args, check=False, timeout=300)

    assert result.returncode == 1, result.stderr
    (line,) = error_lines(result.stderr)
    assert re.search(r"loss became (nan|-?inf) at experience 0, step \d+", line), line
    assert "FAILED" in line
    assert "Traceback" not in result.stderr
    run, _ = failed_run(uri)
    assert run.data.params["method.lr"] == "1e+30"
    assert not any(key.startswith("acc/") for key in run.data.metrics)


@pytest.mark.slow
def test_earlier_experiences_stay_logged(workdir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the CLI runs in workdir; it imports this file
    uri = store_uri(workdir)
    target = f"method._target_={__name__}.PoisonSecondExperience"
    args = [f"tracking.uri={uri}", "benchmark.n_experiences=2", *FAST, target]
    result = run_cli(workdir, *args, check=False, timeout=300)

    assert result.returncode == 1, result.stderr
    (line,) = error_lines(result.stderr)
    assert "at experience 1, step 0" in line, line
    assert "[1/2]" in result.stdout and "[2/2]" not in result.stdout
    run, names = failed_run(uri)
    assert RESUME_FOLDER in names and "accuracy_matrix.json" not in names  # kept: not FINISHED
    assert run.data.params["benchmark.n_experiences"] == "2"
    client = MlflowClient(uri)
    for key in ("acc/exp_0", "acc/exp_1", "acc/seen"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0], key
    assert run.data.metrics["acc/exp_0"] > 0.5
