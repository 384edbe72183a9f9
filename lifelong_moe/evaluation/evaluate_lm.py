"""Evaluate a language model on every validation domain: loss, perplexity, next-byte accuracy.

The loss is the exact mean over all validation bytes of a domain (nats per byte; summed per
batch, divided once), not a mean of batch means. ``accuracy`` (top-1 next-byte accuracy) fills
the accuracy row, so the accuracy-matrix metrics work unchanged; the loss row builds the loss
matrix ``L[i][j]`` for :func:`lifelong_moe.evaluation.metrics.summarize_loss`. Under DDP each
rank evaluates a shard and the sums are all-reduced (evaluation/shard.py). Targets of -100
(prompt and padding of instruction examples, data/instructions.py) are not scored; a stream whose
``accuracy_unit`` is ``"example"`` gets exact match per example as its accuracy row. Same interface
and result type as :func:`lifelong_moe.evaluation.evaluate.evaluate`.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from lifelong_moe.evaluation.evaluate import Evaluation, ExpertMask, RoutingCounts, forward
from lifelong_moe.evaluation.shard import shard_loader, sum_over_ranks
from lifelong_moe.log import LOGGER
from lifelong_moe.stream import Stream

IGNORE = -100  # targets not scored (prompt and padding of instruction examples)
PROGRESS_S = 10.0  # a long evaluation says how far it is at most this often


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    stream: Stream,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    expert_mask: ExpertMask | None = None,
) -> Evaluation:
    """Validation loss of ``model`` on each domain of the stream (all of them, also future)."""
    was_training = model.training
    model.eval()
    per_example = getattr(stream, "accuracy_unit", "token") == "example"
    losses, accuracy, routing = [], [], RoutingCounts()
    start = last = time.perf_counter()
    for j, exp in enumerate(stream.experiences):
        total = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        n_tokens = torch.zeros((), dtype=torch.long, device=device)
        n_examples = torch.zeros((), dtype=torch.long, device=device)
        mask = expert_mask(exp) if expert_mask is not None else None
        for batch in shard_loader(exp.test, batch_size):
            x, y = batch[0].to(device), batch[1].to(device)
            logits, aux = forward(model, x, mask)
            flat = logits.reshape(-1, logits.shape[-1]).float()
            total += nn.functional.cross_entropy(flat, y.reshape(-1), reduction="sum")
            scored = y != IGNORE  # instruction streams score response tokens only
            right = (logits.argmax(-1) == y) | ~scored
            if per_example:
                correct += right.all(-1).sum()
            else:
                correct += (right & scored).sum()
            n_tokens += scored.sum()
            n_examples += len(y)
            routing.add(aux, len(y))
        for value in (total, correct, n_tokens, n_examples):  # every rank's shard
            sum_over_ranks(value)
        scored_count = int(n_examples if per_example else n_tokens)
        losses.append(total.item() / max(int(n_tokens), 1))
        accuracy.append(correct.item() / max(scored_count, 1))
        routing.end_experience()
        now = time.perf_counter()
        if now - last >= PROGRESS_S:  # only long evaluations print; the outcome never depends on it
            last = now
            LOGGER.info(
                f"evaluating: {j + 1}/{len(stream.experiences)} domains in {now - start:.0f}s"
            )
    model.train(was_training)
    return Evaluation(
        accuracy=accuracy,
        routing=routing.by_layer(),
        routing_stats=routing.stats_by_layer(),
        loss=losses,
        perplexity=[math.exp(v) for v in losses],
    )
