"""``benchmark=instruction_domains``: instruction tuning as a sequence of experiences.

Each experience is one domain of ``benchmark.text_dir``: a ``<domain>.jsonl`` file or a
``<domain>/`` folder of them, one ``{"prompt": ..., "response": ...}`` object per line.

An example becomes one sequence of ``context_length + 1`` tokens: with a chat template (a Hugging
Face tokenizer that has one) the prompt is the user turn rendered with the generation prompt
and the response is what the full conversation adds after it; without one, ``prompt + "\\n"``
then ``response`` then EOS. ``y`` is the sequence shifted by one with every position that
predicts a prompt token or padding set to ``IGNORE`` (-100), so the LM loss
(``cross_entropy``'s ``ignore_index``) is the mean over response tokens only; padding is EOS in
``x``. Sequences longer than the window are cut at the end (the response loses its tail).

``val_fraction`` of the examples (at least one), drawn by seed, are held out: they are the
experience's test set. The accuracy row is exact match per held-out example (every response
token is the model's top-1 given the true prefix, which is exactly when greedy decoding
reproduces the response), so the accuracy matrix is the exact-match forgetting matrix; the loss
row is the mean loss per response token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lifelong_moe import checks
from lifelong_moe.data.corpus import Domain, find_domains, jsonl_records
from lifelong_moe.data.shards import default_cache_dir
from lifelong_moe.data.tokenizer import (
    TRAIN_PREFIX,
    Tokenizer,
    TransformersTokenizer,
    load_tokenizer,
)
from lifelong_moe.errors import ConfigError
from lifelong_moe.stream import Experience, Stream

IGNORE = -100


def read_examples(domain: Domain) -> list[tuple[str, str]]:
    """(prompt, response) of every line of the domain's jsonl files; bad lines name file:line."""
    examples = []
    for path in domain.files:
        for number, record, _ in jsonl_records(path):
            if not all(isinstance(record.get(k), str) for k in ("prompt", "response")):
                raise ConfigError(
                    f"{path}:{number}: expected a JSON object with string fields 'prompt' "
                    "and 'response'"
                )
            examples.append((record["prompt"], record["response"]))
    if not examples:
        raise ConfigError(
            f"benchmark domain {domain.name!r} is empty: no examples in {domain.root}"
        )
    return examples


def encode_example(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Prompt ids and response ids (the response ends with EOS or the template's end of turn)."""
    if isinstance(tokenizer, TransformersTokenizer) and tokenizer.chat_template:
        user = [{"role": "user", "content": prompt}]
        both = [*user, {"role": "assistant", "content": response}]
        head = list(
            tokenizer.hf.apply_chat_template(
                user, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        full = list(tokenizer.hf.apply_chat_template(both, tokenize=True, return_dict=False))
        if full[: len(head)] == head:
            return head, full[len(head) :]
    return tokenizer.encode(prompt + "\n"), [*tokenizer.encode(response), tokenizer.eos_id]


def example_tensors(
    prompt_ids: Sequence[int], response_ids: Sequence[int], context_length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [L] and y [L]: y is x shifted by one, IGNORE where it is not a response token."""
    ids = [*prompt_ids, *response_ids][: context_length + 1]
    is_response = [False] * len(prompt_ids) + [True] * len(response_ids)
    is_response = is_response[: len(ids)]
    x = torch.full((context_length,), pad_id, dtype=torch.long)
    y = torch.full((context_length,), IGNORE, dtype=torch.long)
    n = len(ids) - 1
    x[:n] = torch.tensor(ids[:-1])
    targets = torch.tensor(ids[1:])
    keep = torch.tensor(is_response[1:])
    y[:n] = torch.where(keep, targets, torch.full_like(targets, IGNORE))
    return x, y


@dataclass
class InstructionStream(Stream):
    """Instruction experiences; ``accuracy_unit = "example"``: the accuracy row is exact match."""

    accuracy_unit: str = "example"
    tokenizer: Tokenizer | None = None


def instruction_domains(
    text_dir: str | None = None,
    domains: Sequence[str] | None = None,
    tokenizer: str = "bytes",
    context_length: int = 128,
    val_fraction: float = 0.1,
    cache_dir: str | None = None,
    tokenizer_sample_bytes: int = 4_000_000,
    seed: int = 0,
    task_labels: bool = False,
) -> InstructionStream:
    """One experience per domain: TensorDataset(x [N, L], y [N, L] with IGNORE, t [N])."""
    checks.positive_int("benchmark.context_length", context_length)
    checks.number(
        "benchmark.val_fraction", val_fraction, low=0, high=1, low_open=True, high_open=True
    )
    found = find_domains(text_dir, domains)
    data = [read_examples(d) for d in found]
    sample = None
    if isinstance(tokenizer, str) and tokenizer.startswith(TRAIN_PREFIX):
        per = tokenizer_sample_bytes // len(found)
        sample = [p + "\n" + r for examples in data for p, r in examples[: max(1, per // 256)]]
    tok = load_tokenizer(tokenizer, sample, Path(cache_dir) if cache_dir else default_cache_dir())
    experiences = []
    for index, (domain, examples) in enumerate(zip(found, data, strict=True)):
        if len(examples) < 2:
            raise ConfigError(
                f"benchmark domain {domain.name!r} has {len(examples)} example: expected at "
                "least 2 (one to train on, one held out)"
            )
        pairs = [
            example_tensors(*encode_example(tok, p, r), context_length, tok.eos_id)
            for p, r in examples
        ]
        x = torch.stack([p[0] for p in pairs])
        y = torch.stack([p[1] for p in pairs])
        n_held = max(1, round(val_fraction * len(examples)))
        order = np.random.default_rng([seed, index]).permutation(len(examples))
        held, train = np.sort(order[:n_held]), np.sort(order[n_held:])
        if not len(train):
            raise ConfigError(f"benchmark domain {domain.name!r}: no example left to train on")
        task = index if task_labels else 0
        experiences.append(
            Experience(
                index=index,
                train=TensorDataset(x[train], y[train], torch.full((len(train),), task)),
                test=TensorDataset(x[held], y[held], torch.full((len(held),), task)),
                classes=list(range(tok.vocab_size)),
                task_id=task,
            )
        )
    return InstructionStream.of_windows(
        "instruction_domains",
        experiences,
        tok.vocab_size,
        context_length,
        task_labels,
        tokenizer=tok,
    )
