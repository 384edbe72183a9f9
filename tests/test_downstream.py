"""Downstream evaluation with lm-evaluation-harness on a local task (nothing downloaded).

The toolkit's byte-level LM is wrapped as an lm-eval model; a multiple-choice YAML task over a
local jsonl gives the accuracy computed here by hand from the model's own log-likelihoods.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lifelong_moe import names
from lifelong_moe.data.tokenizer import ByteTokenizer
from lifelong_moe.errors import ConfigError
from lifelong_moe.models.lm import CausalLM

pytest.importorskip("lm_eval")
from lifelong_moe.evaluation import downstream  # noqa: E402

QUESTIONS = [
    ("The cat sat on the", ["mat", "sky", "idea"], 0),
    ("One, two, three,", ["four", "blue", "dog"], 0),
    ("def main():\n    return", [" 0", " banana", " ("], 1),
    ("import numpy as", [" np", " pd", " xyz"], 2),
    ("Hello", [" world", " there", "!"], 1),
]


def write_task(folder: Path) -> None:
    """A multiple-choice task as a user writes one: YAML + local jsonl."""
    data = folder / "toy.jsonl"
    lines = [json.dumps({"q": q, "choices": c, "gold": g}) for q, c, g in QUESTIONS]
    data.write_text("\n".join(lines) + "\n")
    (folder / "toy_choice.yaml").write_text(
        "task: toy_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n"
    )


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hand_loglikelihood(model: torch.nn.Module, context: str, continuation: str) -> float:
    """log p(continuation | context) with one forward over the bytes, no lm-eval code."""
    ids = list((context + continuation).encode())
    n = len(context.encode())
    logits = model(torch.tensor([ids[:-1]]))[0][0]
    logp = F.log_softmax(logits.float(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(n, len(ids)))


def test_local_task_accuracy_equals_hand_computed(tmp_path: Path) -> None:
    write_task(tmp_path)
    torch.manual_seed(0)
    model = CausalLM(
        input_shape=[64], n_classes=256, d_model=32, d_hidden=32, n_heads=2, n_blocks=1
    ).eval()
    manager = downstream.check_tasks(["toy_choice"], str(tmp_path))
    got = downstream.downstream_metrics(
        model, ByteTokenizer(), 64, torch.device("cpu"), ["toy_choice"], manager
    )
    right = 0
    with torch.no_grad():
        for question, choices, gold in QUESTIONS:
            # lm-eval's multiple choice: continuation = " " + choice (its target delimiter)
            scores = [hand_loglikelihood(model, question, " " + c) for c in choices]
            right += int(max(range(len(choices)), key=scores.__getitem__) == gold)
    expected = right / len(QUESTIONS)
    assert got[names.downstream_metric("toy_choice", "acc,none")] == pytest.approx(expected)
    assert 0 < expected < 1, "the toy task should separate a right from a wrong scorer"


def test_unknown_task_is_one_line(tmp_path: Path) -> None:
    write_task(tmp_path)
    with pytest.raises(ConfigError, match="unknown task 'toy_choise'") as error:
        downstream.check_tasks(["toy_choise"], str(tmp_path))
    assert "\n" not in str(error.value)


def test_progress_lines_while_lm_eval_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two local tasks of 5 questions x 3 choices: 30 loglikelihood requests, grouped by task;
    a line where each task's requests begin, every 4 requests and after the last (the logger
    writes to stdout)."""
    write_task(tmp_path)
    second = (tmp_path / "toy_choice.yaml").read_text().replace("task: toy_choice", "task: toy_b")
    (tmp_path / "toy_b.yaml").write_text(second)
    model = CausalLM(input_shape=[64], n_classes=256, d_model=16, d_hidden=16, n_heads=2).eval()
    tasks = ["toy_choice", "toy_b"]
    manager = downstream.check_tasks(tasks, str(tmp_path))
    capsys.readouterr()
    got = downstream.downstream_metrics(
        model, ByteTokenizer(), 64, torch.device("cpu"), tasks, manager, progress_every=4
    )
    assert set(got) >= {"downstream/toy_choice/acc", "downstream/toy_b/acc"}
    lines = [
        line.rsplit(", ", 1)[0] if "/s" in line else line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("lm-eval ")
    ]
    order = [line.split("task ")[1].split(",")[0] for line in lines if "request 1 " in line]
    first, then = order[0], "toy_b" if order[0] == "toy_choice" else "toy_choice"
    counts = [(n, first if n <= 15 else then) for n in [*range(4, 30, 4), 30]]
    assert lines == [
        f"lm-eval loglikelihood: task {first}, from request 1 of 30",
        *(f"lm-eval loglikelihood: {n}/30 requests (task {t})" for n, t in counts if n < 16),
        f"lm-eval loglikelihood: task {then}, from request 16 of 30",
        *(f"lm-eval loglikelihood: {n}/30 requests (task {t})" for n, t in counts if n >= 16),
    ]
