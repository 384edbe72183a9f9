"""Gradient accumulation on response-only losses: a step of N micro-batches is the step of the
one larger batch (sum of token losses / response tokens of the whole step), not the mean of the
micro-batches' means that Lightning's division by N alone would give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lifelong_moe.data.instructions import IGNORE, instruction_domains
from lifelong_moe.methods.lifelong_moe import LifelongMoE
from lifelong_moe.methods.step_tokens import target_counts
from lifelong_moe.models.lm import CausalLM
from lifelong_moe.moe import MoESettings
from lifelong_moe.run.checkpoints import make_loader

# responses of 1 to 11 bytes: micro-batches hold very different numbers of response tokens
EXAMPLES = [{"prompt": f"q{i}", "response": "ab" * ((i * 7) % 6) + "z"} for i in range(19)]


def stream(tmp_path: Path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return instruction_domains(str(tmp_path), context_length=16, val_fraction=0.1)


def method(data_stream) -> LifelongMoE:
    torch.manual_seed(0)
    model = CausalLM(
        (16,), 257, d_model=16, d_hidden=16, n_heads=2, n_blocks=2, moe=MoESettings(blocks=(1,))
    )
    m = LifelongMoE(model, lambda_aux=0.0, lr=1e-2)
    m.setup_stream(data_stream)
    m.before_experience(data_stream.experiences[0])
    return m


def trainer(accumulate: int, callbacks=(), **limits) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        accumulate_grad_batches=accumulate,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **limits,
    )


def step_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)[0]
    return nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten())


class LargerBatchGradients(L.Callback):
    """At every optimizer step: the accumulated gradients against those of one batch of the
    step's examples (``order``: the loader's example order of the epoch)."""

    def __init__(self, order: list[int], per_step: int) -> None:
        self.order, self.per_step, self.steps = order, per_step, []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        step = trainer.global_step
        index = self.order[step * self.per_step : (step + 1) * self.per_step]
        x, y, _ = module.experience.train[index]
        params = [p for p in module.model.parameters() if p.grad is not None]
        with torch.enable_grad():
            larger = torch.autograd.grad(step_loss(module.model, x, y), params)
            # what Lightning's division by N alone gives: the mean of the micro-batches' means
            parts = [
                step_loss(module.model, x[k : k + 4], y[k : k + 4]) for k in range(0, len(x), 4)
            ]
            means = torch.autograd.grad(sum(parts) / 2, params)
        got = torch.cat([p.grad.flatten() for p in params])
        want = torch.cat([g.flatten() for g in larger])
        self.steps.append(
            {
                "examples": len(index),
                "error": (got - want).abs().max().item(),
                "mean_of_means_error": (torch.cat([g.flatten() for g in means]) - want)
                .abs()
                .max()
                .item(),
                "scale": want.abs().max().item(),
            }
        )


def test_response_counts_differ_per_example(tmp_path: Path) -> None:
    data = stream(tmp_path).experiences[0].train
    counts = target_counts(data)
    assert counts.tolist() == (data.tensors[1] != IGNORE).sum(1).tolist()
    assert counts.min() == 2 and counts.max() == 12  # "z"+EOS up to "ababababab"+"z"+EOS
    assert target_counts(Subset(data, [3, 1])).tolist() == counts[[3, 1]].tolist()


class Gradients(L.Callback):
    """The gradients each optimizer step is about to apply."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad.flatten() for p in module.model.parameters() if p.grad is not None]
        self.steps.append(torch.cat(grads).clone())


def test_accumulated_2x4_equals_one_batch_of_8(tmp_path: Path) -> None:
    """8 examples in micro-batches of 4 (8 and 46 response tokens) accumulated twice give the
    gradient of one batch of 8; the mean of the two micro-batches' means does not. (Weights after several AdamW steps are no test: Adam's first step is about
    lr * sign(gradient), so float noise in a near-zero gradient moves a weight by lr.)"""
    data_stream = stream(tmp_path)
    train = data_stream.experiences[0].train
    by_length = target_counts(train).argsort(stable=True)
    data = Subset(train, [*by_length[:4].tolist(), *by_length[-4:].tolist()])
    assert target_counts(data).tolist() == [2, 2, 2, 2, 10, 12, 12, 12]
    gradients = []
    for batch, accumulate in ((8, 1), (4, 2)):
        seen = Gradients()
        trainer(accumulate, [seen], max_steps=1).fit(method(data_stream), DataLoader(data, batch))
        gradients.append(seen.steps[0])
    larger, accumulated = gradients
    assert (accumulated - larger).abs().max().item() < 1e-5 * larger.abs().max().item()
    m = method(data_stream)
    x, y, _ = train[data.indices]
    params = [p for p in m.model.parameters() if p.requires_grad]
    parts = [step_loss(m.model, x[k : k + 4], y[k : k + 4]) for k in (0, 4)]
    means = torch.autograd.grad(sum(parts) / 2, params, allow_unused=True)
    means = torch.cat([g.flatten() for g in means if g is not None])
    assert (means - larger).abs().max().item() > 0.01 * larger.abs().max().item()


def test_each_step_is_the_larger_batch_in_the_loaders_order(tmp_path: Path) -> None:
    """The shuffled training loader of a run (EpochSampler) over 17 examples in micro-batches of
    4, 2 per step: steps of 8, 8 and the epoch's last 1, each with the gradient of one batch of
    its examples; the mean of the micro-batch means is off by far more."""
    data_stream = stream(tmp_path)
    m = method(data_stream)
    loader = make_loader(m.experience.train, batch_size=4, num_workers=0, seed=3)
    check = LargerBatchGradients(list(loader.sampler), per_step=8)
    trainer(2, [check], max_epochs=1).fit(m, loader)
    assert [s["examples"] for s in check.steps] == [8, 8, 1]
    for s in check.steps:
        assert s["error"] < 1e-5 * max(1.0, s["scale"])
    assert check.steps[0]["mean_of_means_error"] > 100 * max(check.steps[0]["error"], 1e-7)


def test_without_accumulation_the_step_is_unchanged(tmp_path: Path) -> None:
    """accumulate_grad_batches=1 keeps the mean cross-entropy of each batch as it was."""
    data_stream = stream(tmp_path)
    m = method(data_stream)
    x, y, t = m.experience.train[:4]
    tr = trainer(1, max_steps=0)
    tr.fit(m, DataLoader(m.experience.train, batch_size=4))
    assert m.training_step((x, y, t), 0).item() == pytest.approx(
        step_loss(m.model, x, y).item(), rel=1e-6
    )


def test_resume_under_accumulation_is_exact(tmp_path: Path) -> None:
    """A step checkpoint taken under accumulation (23 examples: steps of 8, 8 and 7 per epoch,
    so the scale differs at each epoch's end) resumes to bit-identical weights."""
    from tests.test_budget import data, train, trainer_cfg

    cfg = trainer_cfg(batch_size=4, max_steps=7, accumulate_grad_batches=2, every_n_steps=2)
    whole, _, _ = train(cfg, data(), folder=tmp_path / "a")
    ckpt = tmp_path / "a" / "exp0-step4.ckpt"
    resumed, trainer, _ = train(cfg, data(), folder=tmp_path / "b", ckpt=ckpt, seed=5)
    assert trainer.global_step == 7
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class SaveGradients(L.Callback):
    """Rank 0 saves the (all-reduced) gradients of the first optimizer step."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if trainer.global_rank == 0 and trainer.global_step == 0:
            grads = [p.grad.flatten() for p in module.model.parameters() if p.grad is not None]
            torch.save(torch.cat(grads), self.path)


def ddp_gradient(folder: str) -> None:
    """Run in a process of its own (ddp_fork): 2 ranks x 2 micro-batches of 4, one step."""
    data_stream = stream(Path(folder) / "text")
    data = Subset(data_stream.experiences[0].train, range(16))
    ddp = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        accumulate_grad_batches=2,
        max_steps=1,
        callbacks=[SaveGradients(Path(folder) / "ddp.pt")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ddp.fit(method(data_stream), DataLoader(data, batch_size=4))


def test_two_ranks_accumulating_equal_one_batch_of_16(tmp_path: Path) -> None:
    """Under DDP the step's tokens are summed over ranks: 2 ranks x 2 micro-batches of 4 (the
    distributed sampler's halves, 20 to 50 response tokens each) give one batch of 16."""
    code = f"from tests.test_grad_accumulation import ddp_gradient; ddp_gradient({str(tmp_path)!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    data_stream = stream(tmp_path / "text")
    x, y, _ = data_stream.experiences[0].train[list(range(16))]
    m = method(data_stream)
    params = [p for p in m.model.parameters() if p.requires_grad]
    larger = torch.autograd.grad(step_loss(m.model, x, y), params, allow_unused=True)
    larger = torch.cat([g.flatten() for g in larger if g is not None])
    got = torch.load(tmp_path / "ddp.pt")
    assert (got - larger).abs().max().item() < 1e-5 * larger.abs().max().item()
