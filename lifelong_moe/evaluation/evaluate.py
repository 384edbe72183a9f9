"""Evaluate a model on every test experience: one interface, one result type for every stream.

``evaluation.evaluator.evaluator_for(stream)`` picks :func:`evaluate` (classification: class-IL and task-IL accuracy
through torchmetrics) or :func:`lifelong_moe.evaluation.evaluate_lm.evaluate_lm` (language
modelling: exact per-byte loss, perplexity, next-byte accuracy). Both take the same arguments
and return an :class:`Evaluation`, so the runner never asks which one it called. Routing shares
come from the MoE layers' own token counts (:class:`RoutingCounts`), so they cost nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lifelong_moe.evaluation import routing
from lifelong_moe.evaluation.routing import RoutingStats
from lifelong_moe.evaluation.shard import gather_from_ranks, shard_loader, sum_over_ranks
from lifelong_moe.stream import Experience, Stream

ExpertMask = Callable[[Experience], torch.Tensor | None]


@dataclass
class Evaluation:
    """One row of every matrix after one experience (entries per test experience j)."""

    accuracy: list[float]  # class-IL accuracy, or next-byte accuracy for a language model
    accuracy_task: list[float] | None = None  # task-IL accuracy (streams with task labels)
    # routing[layer][j] = share of test experience j's (token, slot) assignments per expert
    routing: list[list[list[float]]] = field(default_factory=list)
    # routing_stats[layer][j]: token counts, chance counts and top-k sets (evaluation/routing.py)
    routing_stats: list[list[RoutingStats]] = field(default_factory=list)
    loss: list[float] | None = None  # language models: nats per byte
    perplexity: list[float] | None = None  # exp(loss)


class Evaluator(Protocol):
    def __call__(
        self,
        model: nn.Module,
        stream: Stream,
        batch_size: int = ...,
        device: str | torch.device = ...,
        expert_mask: ExpertMask | None = None,
    ) -> Evaluation: ...


class RoutingCounts:
    """Per MoE layer, the (token, slot) assignments each expert received, summed over batches,
    and the per-token statistics of :func:`lifelong_moe.evaluation.routing.add_batch`."""

    def __init__(self) -> None:
        self.counts: list[torch.Tensor] = []
        self.stats: list[RoutingStats] = []
        self.rows: list[list[list[float]]] = []  # rows[j][layer] = shares on test experience j
        self.stat_rows: list[list[RoutingStats]] = []  # stat_rows[j][layer]
        self.block = 1  # tokens per example

    def add(self, aux: list, n_examples: int = 1) -> None:
        """One batch's routing; ``n_examples`` rows of the batch (tokens per example: the block
        in which evaluation shards interleave, ``routing.merge_shards``)."""
        ids = aux[0].expert_ids if aux else None
        if ids is not None and n_examples:
            self.block = max(ids.shape[0] // n_examples, 1)
        if not self.counts:
            self.counts = [a.tokens_per_expert.double() for a in aux]
            self.stats = [routing.new_stats(len(a.tokens_per_expert)) for a in aux]
        else:
            self.counts = [c + a.tokens_per_expert for c, a in zip(self.counts, aux, strict=True)]
        for stats, a in zip(self.stats, aux, strict=True):
            if a.expert_ids is not None:
                routing.add_batch(stats, a.expert_ids, a.valid, a.reachable)

    def end_experience(self) -> None:
        for counts in self.counts:  # every rank's shard (evaluation/shard.py)
            sum_over_ranks(counts)
        self.rows.append([(c / c.sum().clamp_min(1)).tolist() for c in self.counts])
        # every rank's statistics, merged as one process computes them (a resume at another
        # process count compares its top-k sets with these)
        shards = gather_from_ranks(self.stats)
        if len(shards) > 1:
            self.stats = [
                routing.merge_shards([shard[i] for shard in shards], self.block)
                for i in range(len(self.stats))
            ]
        self.stat_rows.append(self.stats)
        self.counts, self.stats = [], []

    def by_layer(self) -> list[list[list[float]]]:
        """routing[layer][j] (empty for a model without MoE layers)."""
        if not self.rows or not self.rows[0]:
            return []
        return [list(layer) for layer in zip(*self.rows, strict=True)]

    def stats_by_layer(self) -> list[list[RoutingStats]]:
        """routing_stats[layer][j] (empty for a model without MoE layers)."""
        if not self.stat_rows or not self.stat_rows[0]:
            return []
        return [list(layer) for layer in zip(*self.stat_rows, strict=True)]


def forward(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    return model(x) if mask is None else model(x, expert_mask=mask)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    stream: Stream,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    expert_mask: ExpertMask | None = None,
) -> Evaluation:
    """Accuracy of ``model`` on each of the stream's test experiences (all of them, also future).

    ``expert_mask`` gives the MoE expert mask for a test experience: task-aware routing, where
    the task label (known at test time in task-IL) picks the experts. Under DDP each rank
    evaluates a shard; torchmetrics sums the ranks' counts in ``compute`` (its default
    ``sync_on_compute``), the routing counts are summed here.
    """
    was_training = model.training
    model.eval()
    accuracy, accuracy_task, counts = [], [], RoutingCounts()
    for exp in stream.experiences:
        overall = MulticlassAccuracy(stream.n_classes, average="micro").to(device)
        within_task = MulticlassAccuracy(stream.n_classes, average="micro").to(device)
        task_mask = torch.full((stream.n_classes,), float("-inf"), device=device)
        task_mask[exp.classes] = 0.0
        mask = expert_mask(exp) if expert_mask is not None else None
        for batch in shard_loader(exp.test, batch_size):
            x, y = batch[0].to(device), batch[1].to(device)
            logits, aux = forward(model, x, mask)
            if len(y):  # an empty batch keeps the ranks in step (shard.py); torchmetrics refuses it
                overall.update(logits, y)
                within_task.update(logits + task_mask, y)
            counts.add(aux, len(y))
        accuracy.append(overall.compute().item())
        accuracy_task.append(within_task.compute().item())
        counts.end_experience()
    model.train(was_training)
    return Evaluation(
        accuracy=accuracy,
        accuracy_task=accuracy_task if stream.task_labels else None,
        routing=counts.by_layer(),
        routing_stats=counts.stats_by_layer(),
    )
