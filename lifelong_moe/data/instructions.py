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

Examples are split per domain by a seeded permutation: the first ``test_fraction`` of it (at
least one example) is the test set, the next ``validation_fraction`` (at least one when > 0) the
validation set, the rest is trained on. ``split`` says which held-out set ``Experience.test``
holds: ``test`` (what studies report) or ``validation`` (what settings are chosen on); the
training examples are the same either way. The test set is drawn first so that it is the very
set the old ``val_fraction`` held out for the same seed and share: ``val_fraction`` named it
before there was a validation set, and is still read as ``test_fraction``, with a note.

The accuracy row is exact match per held-out example (every response token is the model's top-1
given the true prefix, which is exactly when greedy decoding reproduces the response), so the
accuracy matrix is the exact-match forgetting matrix; the loss row is the mean loss per response
token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from lifelong_moe import checks
from lifelong_moe.data.arrays import check_fraction, check_split, held_out_size, seeded_parts
from lifelong_moe.data.corpus import Domain, find_domains, jsonl_records
from lifelong_moe.data.shards import default_cache_dir
from lifelong_moe.data.tokenizer import (
    TRAIN_PREFIX,
    Tokenizer,
    TransformersTokenizer,
    load_tokenizer,
)
from lifelong_moe.errors import ConfigError
from lifelong_moe.log import LOGGER
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
    test_fraction: float = 0.1,
    validation_fraction: float = 0.0,
    split: str = "test",
    cache_dir: str | None = None,
    tokenizer_sample_bytes: int = 4_000_000,
    seed: int = 0,
    task_labels: bool = False,
    val_fraction: float | None = None,
) -> InstructionStream:
    """One experience per domain: TensorDataset(x [N, L], y [N, L] with IGNORE, t [N]);
    ``Experience.test`` holds the held-out examples that ``split`` names."""
    checks.positive_int("benchmark.context_length", context_length)
    if val_fraction is not None:
        LOGGER.info(
            f"note: benchmark.val_fraction of instruction_domains is now benchmark.test_fraction;"
            f" read val_fraction={val_fraction} as test_fraction={val_fraction}"
        )
        test_fraction = val_fraction
    test_fraction = check_fraction(test_fraction)
    validation_fraction = check_split(split, validation_fraction)
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
        n = len(examples)
        # test first: the very set the old val_fraction held out for the same seed and share
        sizes = {"test": held_out_size(test_fraction, n)}
        sizes["validation"] = held_out_size(validation_fraction, n)
        parts = seeded_parts(n, sizes, seed, index)
        train, held = parts["train"], parts[split]
        if not len(train):
            raise ConfigError(
                f"benchmark domain {domain.name!r}: no example left to train on after "
                f"test_fraction={test_fraction} and validation_fraction={validation_fraction} "
                f"of its {len(examples)}"
            )
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
