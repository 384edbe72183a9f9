"""Step and token budgets, gradient accumulation, and the training curves (in-process, tiny).

A one-layer token model trained by the toolkit's own Trainer setup (``make_trainer``) and
``ContinualMethod``: max_steps and max_tokens stop exactly, accumulating two batches of 4 equals
one batch of 8, a resume from a step checkpoint under max_steps ends bit-identical with the same
curve points, and the curves reach MLflow with increasing steps across experiences.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from lifelong_moe import names
from lifelong_moe.config.groups import check_budget
from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.methods.lr_schedule import LRSchedule
from lifelong_moe.run import budget, curves, distributed
from lifelong_moe.run.checkpoints import StepCheckpoint, checkpoint_writer, make_loader
from lifelong_moe.run.trainer import make_trainer
from tests.conftest import TINY_RUN, run_cli, runs, store_uri

CONF = Path(__file__).resolve().parent.parent / "conf"
VOCAB, LENGTH = 11, 5  # 5 target tokens per example


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        return self.head(torch.tanh(self.embed(x))), []


def data(n: int = 23) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(VOCAB, (n, LENGTH), generator=g)
    return TensorDataset(x, (x * 3 + 1) % VOCAB)


def trainer_cfg(schedule: dict | None = None, every_n_steps: int = 0, **overrides: object):
    """The run config's trainer (the packaged defaults and ``overrides``), LR schedule and
    checkpoint interval."""
    cfg = OmegaConf.load(CONF / "trainer" / "default.yaml")
    cfg.update({"progress_bar": False, **overrides})
    checkpoint = {"every_n_steps": every_n_steps}
    return OmegaConf.create({"trainer": cfg, "schedule": schedule or {}, "checkpoint": checkpoint})


def train(cfg, dataset, *, every: int = 1, folder: Path | None = None, ckpt=None, seed=0):
    """One experience as run/loop.fit trains it; returns (method, trainer, curve points)."""
    torch.manual_seed(seed)
    method = ContinualMethod(TokenModel(), lr=0.05)
    t = cfg.trainer
    method.set_lr_schedule(LRSchedule(**cfg.schedule))
    loader = make_loader(dataset, t.batch_size, 0, seed=7)
    limits = budget.budget_for(t, len(dataset), LENGTH)
    callbacks = [curves.TrainingCurves(every_n_steps=every)]
    writer = None
    if folder is not None:
        writer = checkpoint_writer(keep=100, background=False)
        saver = StepCheckpoint(folder, 0, cfg.checkpoint.every_n_steps, writer, loader.sampler)
        callbacks.append(saver)  # after the curves, as run/loop.fit orders them
    trainer = make_trainer(cfg, callbacks=callbacks, checkpoint_io=writer, budget=limits)
    trainer.fit(method, loader, ckpt_path=ckpt, weights_only=True)
    return method, trainer, curves.take_points(trainer)


def simulated_steps(max_tokens: int, n: int, batch: int, accumulate: int) -> int:
    """The first optimizer step reaching max_tokens, by running through batches one by one."""
    seen = steps = 0
    while True:
        sizes = [min(batch, n - i) for i in range(0, n, batch)]
        for k, size in enumerate(sizes):
            seen += size * LENGTH
            if (k + 1) % accumulate == 0 or k == len(sizes) - 1:
                steps += 1
                if seen >= max_tokens:
                    return steps


@pytest.mark.parametrize(("max_tokens", "accumulate"), [(97, 2), (115, 1), (600, 3), (1, 1)])
def test_steps_for_tokens_matches_walking_the_batches(max_tokens: int, accumulate: int) -> None:
    got = budget.steps_for_tokens(max_tokens, 23, LENGTH, 4, accumulate)
    assert got == simulated_steps(max_tokens, 23, 4, accumulate)


def test_max_steps_and_max_tokens_are_obeyed_exactly() -> None:
    cfg = trainer_cfg(batch_size=4, max_steps=9, accumulate_grad_batches=2)
    _, trainer, points = train(cfg, data())
    assert trainer.global_step == 9  # past one epoch of 3 steps: the budget, not max_epochs
    tokens = dict(((k, s), v) for k, s, v in points)
    # 3 steps per epoch (batches 4+4, 4+4, 4+3): 9 steps = 3 whole epochs
    assert tokens[(names.CURVE_TOKENS, 9)] == 3 * 23 * LENGTH

    cfg = trainer_cfg(batch_size=4, max_tokens=97 * 3, accumulate_grad_batches=2)
    _, trainer, points = train(cfg, data())
    seen = {s: v for k, s, v in points if k == names.CURVE_TOKENS}
    step = trainer.global_step
    assert seen[step] >= 97 * 3 > seen[step - 1], (step, seen)
    assert curves.take_totals(trainer)[names.TRAIN_TOKENS] == seen[step]


@pytest.mark.parametrize("limit", [{"max_steps": 9}, {"max_tokens": 3 * 23 * LENGTH}])
def test_lr_schedule_spans_the_step_budget(limit: dict) -> None:
    """cosine_rewarm over a budget of 9 steps (3 epochs of 3): warm-up 2, the floor at step 9."""
    cfg = trainer_cfg(
        batch_size=4,
        accumulate_grad_batches=2,
        schedule={"name": "cosine_rewarm", "warmup_steps": 2},
        **limit,
    )
    _, trainer, points = train(cfg, data())
    lr = {s: v for k, s, v in points if k == names.CURVE_LR}
    assert trainer.global_step == 9
    assert lr[1] == 0.0 and lr[3] == pytest.approx(0.05)  # warm-up, then the peak
    floor = LRSchedule(**cfg.schedule).lr_floor
    # half-way through the cosine (step index 5 of 2..8): a schedule sized to one epoch of 3
    # steps (max_epochs taken for the length) would already sit at the floor here
    assert lr[6] == pytest.approx(0.05 * (floor + (1 - floor) * 0.5))
    assert lr[9] == pytest.approx(0.05 * floor)


def test_both_budgets_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^trainer.max_steps=5 with trainer.max_tokens=100: "):
        check_budget({"max_steps": 5, "max_tokens": 100})


def test_accumulation_equals_the_larger_batch() -> None:
    """Two batches of 4 accumulated == one batch of 8 (the same examples, equal sizes)."""
    dataset = data(16)
    big, _, _ = train(trainer_cfg(batch_size=8, max_steps=2), dataset)
    small, _, _ = train(trainer_cfg(batch_size=4, max_steps=2, accumulate_grad_batches=2), dataset)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    before = ContinualMethod(TokenModel(), lr=0.05)  # and training did move the weights
    assert not torch.equal(before.model.head.weight, big.model.head.weight)


def test_resume_from_a_step_checkpoint_under_max_steps_is_exact(tmp_path: Path) -> None:
    cfg = trainer_cfg(batch_size=4, max_steps=8, every_n_steps=2)
    whole, _, points = train(cfg, data(), folder=tmp_path / "a")
    # A fresh process state: another initial model, resumed from the step-4 checkpoint.
    ckpt = tmp_path / "a" / "exp0-step4.ckpt"
    resumed, trainer, resumed_points = train(cfg, data(), folder=tmp_path / "b", ckpt=ckpt, seed=5)
    assert trainer.global_step == 8
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # every step's curve point once, the same values (tokens/s depends on the clock)
    clockless = [p for p in points if p[0] != names.CURVE_TOKENS_PER_S]
    assert [p for p in resumed_points if p[0] != names.CURVE_TOKENS_PER_S] == clockless
    assert sorted({s for _, s, _ in points}) == list(range(1, 9))


def test_curves_in_mlflow_with_increasing_steps(workdir: Path) -> None:
    uri = store_uri(workdir)
    run_cli(
        workdir,
        f"tracking.uri={uri}",
        *TINY_RUN,
        "tracking.log_every_n_steps=3",
        "trainer.val_check_interval=4",
        "evaluation.max_batches=1",
        "tracking.system_metrics=false",
    )
    (run,) = runs(uri)
    client = MlflowClient(uri)

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    steps_per_experience = [v for _, v in sorted(history(names.TRAIN_STEPS))]
    total = int(sum(steps_per_experience))
    assert len(steps_per_experience) == 2 and total > 6
    for key in (names.CURVE_LOSS, names.CURVE_LR, names.CURVE_GRAD_NORM, names.CURVE_TOKENS):
        steps = sorted(s for s, _ in history(key))
        assert steps == list(range(3, total + 1, 3)), key  # one axis over both experiences
    tokens = [v for _, v in sorted(history(names.CURVE_TOKENS))]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    first = int(steps_per_experience[0])
    val_steps = sorted(s for s, _ in history(names.curve_val_loss("exp0")))
    expected = [s for s in range(4, first + 1, 4)] + [
        first + s for s in range(4, total - first + 1, 4)
    ]
    assert val_steps == expected
    # per-experience metrics keep step = experience
    assert sorted(s for s, _ in history(names.TRAIN_LOSS)) == [0, 1]


@pytest.mark.parametrize(("n", "accumulate", "max_tokens"), [(24, 1, 600), (32, 2, 400)])
def test_token_budget_under_two_ranks_takes_half_the_steps(
    n: int, accumulate: int, max_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each optimizer step of 2 ranks trains on twice the tokens (each rank its own batches of
    the distributed sampler's half), so a token budget ends after half the steps."""
    cfg = {"batch_size": 4, "accumulate_grad_batches": accumulate, "max_tokens": max_tokens}
    one = budget.budget_for(cfg, n, LENGTH, world_size=1).max_steps
    two = budget.budget_for(cfg, n, LENGTH, world_size=2).max_steps
    assert one == max_tokens // (4 * accumulate * LENGTH) and two * 2 == one
    # The processes come from the launcher (run/distributed.py), which fit hands to the budget.
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("RANK", "0")
    assert distributed.world_size() == 6
