"""Evaluate a language model on every validation domain: loss, perplexity, next-byte accuracy.

The loss is the exact mean over all validation bytes of a domain (nats per byte; summed per
batch, divided once), not a mean of batch means. ``accuracy`` (top-1 next-byte accuracy) fills
the accuracy row, so the runner's accuracy-matrix metrics work unchanged; the loss row builds
the loss matrix ``L[i][j]`` for :func:`lifelong_moe.evaluation.metrics.summarize_loss`.
Routing shares are counted exactly as in :func:`lifelong_moe.evaluation.evaluate.evaluate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from lifelong_moe.data.stream import Stream
from lifelong_moe.evaluation.evaluate import Evaluation


@dataclass
class LMEvaluation(Evaluation):
    """One row of the loss matrix (and of the next-byte accuracy matrix) after one experience."""

    loss: list[float] = field(default_factory=list)  # nats per byte, per domain
    perplexity: list[float] = field(default_factory=list)  # exp(loss)


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, stream: Stream, batch_size: int = 256, device: str | torch.device = "cpu"
) -> LMEvaluation:
    """Validation loss of ``model`` on each domain of the stream (all of them, also future)."""
    was_training = model.training
    model.eval()
    losses, accuracy, routing = [], [], []
    for exp in stream.experiences:
        total = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        n_tokens = 0
        counts: list[torch.Tensor] = []
        for batch in DataLoader(exp.test, batch_size=batch_size):
            x, y = batch[0].to(device), batch[1].to(device)
            logits, aux = model(x)
            flat = logits.reshape(-1, logits.shape[-1]).float()
            total += nn.functional.cross_entropy(flat, y.reshape(-1), reduction="sum")
            correct += (flat.argmax(-1) == y.reshape(-1)).sum()
            n_tokens += y.numel()
            if not counts:
                counts = [a.tokens_per_expert.double() for a in aux]
            else:
                counts = [c + a.tokens_per_expert for c, a in zip(counts, aux, strict=True)]
        losses.append(total.item() / max(n_tokens, 1))
        accuracy.append(correct.item() / max(n_tokens, 1))
        routing.append([(c / c.sum().clamp_min(1)).tolist() for c in counts])
    model.train(was_training)
    # routing[j][layer] -> routing[layer][j]
    by_layer = (
        [list(layer) for layer in zip(*routing, strict=True)] if routing and routing[0] else []
    )
    return LMEvaluation(
        accuracy=accuracy,
        accuracy_task=None,
        routing=by_layer,
        loss=losses,
        perplexity=[math.exp(v) for v in losses],
    )
