"""Evaluate a language model on every validation domain: loss, perplexity, next-byte accuracy.

The loss is the exact mean over all validation bytes of a domain (nats per byte; summed per
batch, divided once), not a mean of batch means. ``accuracy`` (top-1 next-byte accuracy) fills
the accuracy row, so the accuracy-matrix metrics work unchanged; the loss row builds the loss
matrix ``L[i][j]`` for :func:`lifelong_moe.evaluation.metrics.summarize_loss`. Under DDP each
rank evaluates a shard and the sums are all-reduced (evaluation/shard.py). Targets of -100
(prompt and padding of instruction examples, data/instructions.py) are not scored; a stream whose
``accuracy_unit`` is ``"example"`` gets exact match per example as its accuracy row. The loop is
:class:`lifelong_moe.evaluation.evaluate.Evaluator`'s, shared with classification.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lifelong_moe.evaluation.evaluate import Evaluation, Evaluator, RoutingCounts
from lifelong_moe.evaluation.shard import sum_over_ranks
from lifelong_moe.stream import Experience, Stream

IGNORE = -100  # targets not scored (prompt and padding of instruction examples)


class TokenLoss:
    """Summed loss, right predictions and scored tokens of one domain, on the device (no host
    sync per batch), summed over the ranks once in ``compute``."""

    def __init__(self, per_example: bool, device: str | torch.device) -> None:
        self.per_example = per_example
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.n_tokens = torch.zeros((), dtype=torch.long, device=device)
        self.n_examples = torch.zeros((), dtype=torch.long, device=device)

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        flat = logits.reshape(-1, logits.shape[-1]).float()
        self.total += nn.functional.cross_entropy(flat, y.reshape(-1), reduction="sum")
        scored = y != IGNORE  # instruction streams score response tokens only
        right = (logits.argmax(-1) == y) | ~scored
        if self.per_example:
            self.correct += right.all(-1).sum()
        else:
            self.correct += (right & scored).sum()
        self.n_tokens += scored.sum()
        self.n_examples += len(y)

    def compute(self) -> tuple[float, float]:
        """(nats per scored token, accuracy per token or per example)."""
        for value in (self.total, self.correct, self.n_tokens, self.n_examples):
            sum_over_ranks(value)  # every rank's shard
        scored_count = int(self.n_examples if self.per_example else self.n_tokens)
        loss = self.total.item() / max(int(self.n_tokens), 1)
        return loss, self.correct.item() / max(scored_count, 1)


class LanguageModelEvaluator(Evaluator):
    """Validation loss, perplexity and next-token accuracy of every domain of the stream."""

    batch_size = 256
    unit = "domains"

    def scores(self, stream: Stream, exp: Experience, device: str | torch.device) -> TokenLoss:
        return TokenLoss(getattr(stream, "accuracy_unit", "token") == "example", device)

    def evaluation(
        self, stream: Stream, rows: list[tuple[float, ...]], routing: RoutingCounts
    ) -> Evaluation:
        losses = [row[0] for row in rows]
        return Evaluation(
            accuracy=[row[1] for row in rows],
            routing=routing.by_layer(),
            routing_stats=routing.stats_by_layer(),
            loss=losses,
            perplexity=[math.exp(v) for v in losses],
        )


evaluate_lm = LanguageModelEvaluator()
