"""benchmark=instruction_domains: loss on response tokens only, exact match on held-out examples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lifelong_moe.data.instructions import IGNORE, instruction_domains
from lifelong_moe.data.tokenizer import ByteTokenizer
from lifelong_moe.errors import ConfigError
from lifelong_moe.evaluation.evaluate_lm import evaluate_lm
from lifelong_moe.models.lm import CausalLM

EXAMPLES = [{"prompt": f"add {a} {b}", "response": str(a + b)} for a in range(6) for b in range(5)]


def write(root: Path, name: str, examples: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    return root


class Oracle(nn.Module):
    """Logits that put all mass on the true next token (wrong on ``spoil`` examples' last target)."""

    def __init__(self, lookup: dict[tuple[int, ...], torch.Tensor], vocab: int) -> None:
        super().__init__()
        self.lookup, self.vocab = lookup, vocab

    def forward(self, x: torch.Tensor, expert_mask=None):
        logits = torch.zeros(*x.shape, self.vocab)
        for b, row in enumerate(x):
            target = self.lookup[tuple(row.tolist())]
            logits[b, torch.arange(len(target)), target.clamp(min=0)] = 10.0
        return logits, []


def test_loss_is_over_response_tokens_only(tmp_path: Path) -> None:
    stream = instruction_domains(str(write(tmp_path, "math", EXAMPLES)), context_length=24, seed=1)
    tok = ByteTokenizer()
    test = stream.experiences[0].test
    assert stream.n_classes == 257 and len(test) == 3 and len(stream.experiences[0].train) == 27
    torch.manual_seed(0)
    model = CausalLM((24,), 257, d_model=16, d_hidden=16, n_heads=2, n_blocks=1).eval()
    x, y, _ = test.tensors
    # hand: each held-out example's own ids, the log-probability of each response token
    held = {bytes(t for t in row.tolist() if t < 256).split(b"\n")[0].decode() for row in x}
    total, count = 0.0, 0
    with torch.no_grad():
        logits = model(x)[0].log_softmax(-1)
    for b, row in enumerate(x):
        example = next(
            e
            for e in EXAMPLES
            if e["prompt"] in held
            and tok.encode(e["prompt"] + "\n") == row[: len(e["prompt"]) + 1].tolist()
        )
        prompt, response = (
            tok.encode(example["prompt"] + "\n"),
            [*tok.encode(example["response"]), 256],
        )
        ids = prompt + response
        for t in range(len(prompt) - 1, len(ids) - 1):  # position t predicts ids[t + 1]
            total -= logits[b, t, ids[t + 1]].item()
            count += 1
        assert (y[b] != IGNORE).sum() == len(response)
        assert (x[b, len(ids) - 1 :] == 256).all()  # padding is EOS
    got = evaluate_lm(model, stream, batch_size=2)
    assert got.loss[0] == pytest.approx(total / count, rel=1e-6)
    # the training loss (methods/base.py) ignores the same targets and averages the same way
    ce = nn.functional.cross_entropy(model(x)[0].flatten(0, -2), y.flatten())
    assert ce.item() == pytest.approx(total / count, rel=1e-5)


def test_exact_match_counts_whole_examples(tmp_path: Path) -> None:
    stream = instruction_domains(
        str(write(tmp_path, "math", EXAMPLES)), context_length=24, test_fraction=0.2
    )
    x, y, _ = stream.experiences[0].test.tensors
    lookup = {tuple(a.tolist()): b.clone() for a, b in zip(x, y, strict=True)}
    assert evaluate_lm(Oracle(lookup, 257), stream).accuracy == [1.0]
    spoiled = tuple(x[2].tolist())
    last = int((lookup[spoiled] != IGNORE).nonzero().max())
    lookup[spoiled][last] = (lookup[spoiled][last] + 1) % 256  # one wrong response token
    got = evaluate_lm(Oracle(lookup, 257), stream)
    assert got.accuracy == [pytest.approx((len(x) - 1) / len(x))]
    assert math.isfinite(got.loss[0])


def test_chat_template_marks_the_assistant_turn(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    from lifelong_moe.data.tokenizer import load_tokenizer

    trained = load_tokenizer("train:300", [e["prompt"] + " " + e["response"] for e in EXAMPLES] * 3)
    hf = PreTrainedTokenizerFast(tokenizer_object=trained.backend, eos_token="<|endoftext|>")
    hf.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    hf.save_pretrained(tmp_path / "tok")
    stream = instruction_domains(
        str(write(tmp_path / "text", "math", EXAMPLES)),
        tokenizer=str(tmp_path / "tok"),
        context_length=32,
    )
    x, y, _ = stream.experiences[0].train.tensors
    scored = hf.decode([t for t in y[0].tolist() if t != IGNORE])
    example = next(
        e for e in EXAMPLES if hf.decode(x[0].tolist()).startswith(f"<user>{e['prompt']}<")
    )
    assert scored == example["response"] + "<|endoftext|>"


def test_a_line_without_response_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, "bad", [EXAMPLES[0], {"prompt": "x"}])
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected a JSON object"):
        instruction_domains(str(tmp_path))


def test_train_validation_and_test_are_disjoint_and_fixed_by_seed(tmp_path: Path, capsys) -> None:
    text = str(write(tmp_path, "math", EXAMPLES))

    def examples(data) -> set[bytes]:
        return {row.numpy().tobytes() for row in data.tensors[0]}

    def build(**keys):
        return instruction_domains(text, context_length=24, **keys).experiences[0]

    old = build()  # the defaults: one held-out set of 10 %, the test set
    test = build(validation_fraction=0.2, seed=0)
    valid = build(validation_fraction=0.2, seed=0, split="validation")
    train = examples(valid.train)
    assert examples(test.train) == train  # the same training examples either way
    assert (len(valid.train), len(valid.test), len(test.test)) == (21, 6, 3)
    parts = [train, examples(valid.test), examples(test.test)]
    assert sum(map(len, parts)) == len(set().union(*parts)) == len(EXAMPLES)  # disjoint, cover
    assert examples(test.test) == examples(old.test)  # drawn first: the old held-out set
    assert examples(build(validation_fraction=0.2, split="validation").test) == parts[1]
    other = build(validation_fraction=0.2, seed=1, split="validation")
    assert examples(other.test) != parts[1]
    # the old key still works and means what it meant: the share held out and evaluated
    capsys.readouterr()
    renamed = build(val_fraction=0.2)
    assert capsys.readouterr().out == (
        "note: benchmark.val_fraction of instruction_domains is now benchmark.test_fraction; "
        "read val_fraction=0.2 as test_fraction=0.2\n"
    )
    assert examples(renamed.test) == examples(build(test_fraction=0.2).test)
    with pytest.raises(ConfigError, match=r"^benchmark.split=validation needs benchmark.valid"):
        build(split="validation")
    with pytest.raises(ConfigError, match="no example left to train on"):
        build(test_fraction=0.5, validation_fraction=0.5)
