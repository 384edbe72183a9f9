"""LR schedules of the continual pre-training recipe: values at chosen steps, the scheduler
Lightning actually steps, config errors, and one CLI run read back from MLflow."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.lr_schedule import LRSchedule
from lifelong_moe.methods.naive import Naive
from lifelong_moe.models.mlp import ResidualMLP
from lifelong_moe.moe import MoESettings
from lifelong_moe.stream import Experience
from tests.conftest import FAST, run_cli, runs, store_uri


def test_constant_is_flat_after_its_warmup():
    s = LRSchedule("constant", warmup_steps=4)
    assert [s.factor(k, 10, 0) for k in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert LRSchedule().is_constant and not s.is_constant


def test_cosine_rewarm_rewarms_and_redecays_to_the_floor_at_every_experience():
    s = LRSchedule("cosine_rewarm", warmup_steps=2, lr_floor=0.1)
    total = 12  # warm-up steps 0, 1; cosine over steps 2..11
    for experience in (0, 3):
        assert s.factor(0, total, experience) == 0.0
        assert s.factor(1, total, experience) == 0.5
        assert s.factor(2, total, experience) == pytest.approx(1.0)
        # half-way through the cosine (step 2 + 4.5): (1 + 0.1) / 2
        middle = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 9))
        assert s.factor(6, total, experience) == pytest.approx(middle)
        assert s.factor(11, total, experience) == pytest.approx(0.1)


def test_infinite_warms_up_once_cools_down_holds_and_anneals():
    s = LRSchedule(
        "infinite", warmup_steps=2, lr_floor=0.1, lr_constant=0.5, cooldown_steps=4, anneal_steps=2
    )
    first = [s.factor(k, 12, 0) for k in range(12)]
    assert first[:3] == [0.0, 0.5, 1.0]
    assert first[4] == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    assert first[6:10] == [0.5] * 4  # constant phase
    assert first[10:] == pytest.approx([0.3, 0.1])  # linear anneal to the floor
    later = [s.factor(k, 8, 1) for k in range(8)]
    assert later[:6] == [0.5] * 6  # no re-warming, no second cool-down
    assert later[6:] == pytest.approx([0.3, 0.1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "linear"}, "schedule.name='linear'"),
        ({"warmup_steps": -1}, "schedule.warmup_steps=-1"),
        ({"lr_floor": 1.5}, "schedule.lr_floor=1.5"),
        ({"name": "infinite", "lr_floor": 0.6, "lr_constant": 0.5}, "schedule.lr_floor=0.6"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        LRSchedule(**kwargs)


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_lightning_steps_the_schedule_over_the_experience():
    torch.manual_seed(0)
    model = ResidualMLP([4], 2, d_model=8, d_hidden=8, moe=MoESettings(enabled=False))
    method = Naive(model, lr=0.01)
    method.set_lr_schedule(LRSchedule("cosine_rewarm", warmup_steps=2, lr_floor=0.1))
    data = TensorDataset(torch.randn(24, 4), torch.randint(0, 2, (24,)), torch.zeros(24).long())
    exp = Experience(1, data, data, classes=[0, 1])
    method.before_experience(exp)
    recorder = Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(method, DataLoader(data, batch_size=4))  # 6 batches x 2 epochs = 12 steps
    expected = [0.01 * method.lr_schedule.factor(k, 12, 1) for k in range(12)]
    assert recorder.lrs == pytest.approx(expected)
    assert recorder.lrs[-1] == pytest.approx(0.001)


def test_cli_runs_with_cosine_rewarm_and_logs_it(tmp_path: Path):
    # The keys from before issue 21 (trainer.lr_schedule, ...): read as schedule.*, with a note.
    uri = store_uri(tmp_path)
    result = run_cli(
        tmp_path,
        "benchmark=split_digits",
        "benchmark.n_experiences=2",
        "trainer.lr_schedule=cosine_rewarm",
        "schedule.warmup_steps=5",
        *FAST,
        f"tracking.uri={uri}",
    )
    (run,) = runs(uri)
    assert run.data.params["schedule.name"] == "cosine_rewarm"
    assert run.data.params["schedule.warmup_steps"] == "5"
    assert "trainer.lr_schedule" not in run.data.params
    assert "note: trainer.lr_schedule is now schedule.name" in result.stdout
    assert 0 <= run.data.metrics["acc/seen"] <= 1


def test_cli_rejects_a_bad_schedule_before_training(tmp_path: Path):
    result = run_cli(tmp_path, "schedule.name=linear", *FAST, check=False)
    assert result.returncode != 0
    assert "schedule.name='linear': expected one of" in result.stderr
    assert not (tmp_path / "mlflow.db").exists() or not runs(store_uri(tmp_path))
