"""The one evaluation loop: both evaluators share arguments, eval mode and progress lines."""

from __future__ import annotations

import pytest
import torch

from lifelong_moe.data.digits import split_digits
from lifelong_moe.data.text import VOCAB_SIZE, text_domains
from lifelong_moe.evaluation import evaluate as evaluate_module
from lifelong_moe.evaluation.evaluate import Evaluation, evaluate
from lifelong_moe.evaluation.evaluate_lm import evaluate_lm
from lifelong_moe.evaluation.evaluator import evaluator_for
from lifelong_moe.models.lm import CausalLM
from lifelong_moe.models.mlp import ResidualMLP
from lifelong_moe.moe import MoESettings


def cases() -> list:
    torch.manual_seed(0)
    digits = split_digits(n_experiences=5, seed=0)
    mlp = ResidualMLP(digits.input_shape, digits.n_classes, d_model=32, d_hidden=32, n_blocks=1,
                      moe=MoESettings(blocks=(0,)))  # fmt: skip
    text = text_domains(domains=["yaml", "python"], context_length=16, max_bytes_per_domain=8192)
    lm = CausalLM((16,), VOCAB_SIZE, d_model=32, d_hidden=32, n_heads=4, n_blocks=2,
                  moe=MoESettings(blocks=(1,)))  # fmt: skip
    return [(digits, mlp, "experiences", evaluate), (text, lm, "domains", evaluate_lm)]


@pytest.mark.parametrize("index", [0, 1], ids=["classification", "language_model"])
def test_one_loop_for_both_kinds(index: int, monkeypatch, capsys) -> None:
    stream, model, unit, expected = cases()[index]
    assert evaluator_for(stream) is expected
    monkeypatch.setattr(evaluate_module, "PROGRESS_S", 0.0)  # every experience says so
    model.train()
    capsys.readouterr()
    got = evaluator_for(stream)(model, stream, batch_size=64, expert_mask=lambda exp: None)
    assert model.training  # the model's mode comes back as it was
    assert isinstance(got, Evaluation)
    n = len(stream.experiences)
    assert len(got.accuracy) == n and all(0.0 <= a <= 1.0 for a in got.accuracy)
    assert len(got.routing) == 1 and len(got.routing[0]) == n  # one MoE layer, every experience
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("evaluating")]
    assert [line.split(" in ")[0] for line in lines] == [
        f"evaluating: {j}/{n} {unit}" for j in range(1, n + 1)
    ]
    # the batch size changes the batches, not the outcome
    again = evaluator_for(stream)(model, stream, batch_size=7)
    assert again.accuracy == pytest.approx(got.accuracy)
    if got.loss is not None:
        assert again.loss == pytest.approx(got.loss) and got.perplexity is not None
