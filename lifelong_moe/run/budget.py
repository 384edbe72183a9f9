"""How long one experience trains: epochs (the default), optimizer steps, or tokens.

``trainer.max_steps`` and ``trainer.max_tokens`` each replace ``trainer.max_epochs``; giving
both is refused. A token budget becomes the exact step count at which the global token count
(all ranks) first reaches ``max_tokens``: every training example of a stream holds the same
number of target tokens (fixed windows, one label per image), so that step is known before
training from the data's size and the batch layout, and Lightning's own ``max_steps`` stops
there. The learning-rate schedules then see the true length of the experience through
``Trainer.estimated_stepping_batches``, which counts ``max_steps`` when it is set.

Tokens are target positions, as in ``cost/tokens_per_s`` (measure/throughput.py): every
position of a language-model window, one per example for a classifier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lifelong_moe import checks
from lifelong_moe.config.groups import check_budget


@dataclass(frozen=True)
class Budget:
    """What the Trainer gets: ``max_epochs`` or ``max_steps`` (-1: not the limit)."""

    max_epochs: int
    max_steps: int = -1


def steps_for_tokens(
    max_tokens: int,
    n_examples: int,
    tokens_per_example: int,
    batch_size: int,
    accumulate: int = 1,
    world_size: int = 1,
) -> int:
    """The first optimizer step at which the global token count reaches ``max_tokens``.

    Walks the epochs as Lightning runs them: each rank gets ``ceil(n / world_size)`` examples
    (the distributed sampler pads), batches of ``batch_size`` with a smaller last one, and an
    optimizer step every ``accumulate`` batches and at the end of every epoch.
    """
    checks.positive_int("trainer.max_tokens", max_tokens)
    per_rank = math.ceil(n_examples / world_size)
    batches = [batch_size] * (per_rank // batch_size) + [per_rank % batch_size] * bool(
        per_rank % batch_size
    )
    epoch_steps = [
        sum(batches[i : i + accumulate]) * tokens_per_example * world_size
        for i in range(0, len(batches), accumulate)
    ]
    per_epoch = sum(epoch_steps)
    full_epochs = (max_tokens - 1) // per_epoch  # epochs that end before the budget is reached
    seen, steps = full_epochs * per_epoch, full_epochs * len(epoch_steps)
    for tokens in epoch_steps:
        seen, steps = seen + tokens, steps + 1
        if seen >= max_tokens:
            return steps
    raise AssertionError("unreachable: the last epoch reaches the budget")  # pragma: no cover


def budget_for(
    trainer: Mapping[str, Any],
    n_examples: int,
    tokens_per_example: int,
    world_size: int = 1,
) -> Budget:
    """The Trainer limits of one experience of ``n_examples`` training examples."""
    check_budget(trainer)
    if trainer.get("max_steps") is not None:
        return Budget(
            max_epochs=-1, max_steps=checks.positive_int("trainer.max_steps", trainer["max_steps"])
        )
    if trainer.get("max_tokens") is not None:
        steps = steps_for_tokens(
            trainer["max_tokens"],
            n_examples,
            tokens_per_example,
            trainer.get("batch_size", 1),
            trainer.get("accumulate_grad_batches", 1),
            world_size,
        )
        return Budget(max_epochs=-1, max_steps=steps)
    return Budget(max_epochs=trainer.get("max_epochs", 1))
