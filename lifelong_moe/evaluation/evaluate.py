"""Evaluate a model on every test experience: one loop, one result type for every stream.

:class:`Evaluator` is the loop (eval mode, no gradients, DDP shards, expert masks, routing
counts, progress); ``evaluation.evaluator.evaluator_for(stream)`` picks its classification
instance :data:`evaluate` (class-IL and task-IL accuracy through torchmetrics) or
:data:`lifelong_moe.evaluation.evaluate_lm.evaluate_lm` (language modelling: exact per-token
loss, perplexity, next-token accuracy). Both take the same arguments and return an
:class:`Evaluation`, so the runner never asks which one it called. Routing shares come from the
MoE layers' own token counts (:class:`RoutingCounts`), so they cost nothing extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lifelong_moe.evaluation import routing
from lifelong_moe.evaluation.routing import RoutingStats
from lifelong_moe.evaluation.shard import gather_from_ranks, shard_loader, sum_over_ranks
from lifelong_moe.log import LOGGER
from lifelong_moe.stream import Experience, Stream

ExpertMask = Callable[[Experience], torch.Tensor | None]
PROGRESS_S = 10.0  # a long evaluation says how far it is at most this often


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


class Scores(Protocol):
    """What one test experience accumulates, batch by batch, and its entries of the rows."""

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None: ...

    def compute(self) -> tuple[float, ...]: ...


class Evaluator:
    """One pass of a model over every test experience of a stream, in eval mode, without
    gradients; subclasses say how a batch is scored (:meth:`scores`) and what the rows become
    (:meth:`evaluation`). One loop, so both evaluators shard, mask, count routing and report
    progress alike, and take the same arguments.
    """

    batch_size = 1024  # the default eval batch of this kind of stream
    unit = "experiences"  # what the progress line counts

    def scores(self, stream: Stream, exp: Experience, device: str | torch.device) -> Scores:
        raise NotImplementedError

    def evaluation(
        self, stream: Stream, rows: list[tuple[float, ...]], routing: RoutingCounts
    ) -> Evaluation:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        stream: Stream,
        batch_size: int | None = None,
        device: str | torch.device = "cpu",
        expert_mask: ExpertMask | None = None,
    ) -> Evaluation:
        """Score ``model`` on each of the stream's test experiences (all of them, also future).

        ``expert_mask`` gives the MoE expert mask for a test experience: task-aware routing,
        where the task label (known at test time in task-IL) picks the experts. Under DDP each
        rank evaluates a shard; the scores and routing counts are summed over the ranks.
        """
        was_training = model.training
        model.eval()
        rows, routing = [], RoutingCounts()
        start = last = time.perf_counter()
        for j, exp in enumerate(stream.experiences):
            scores = self.scores(stream, exp, device)
            mask = expert_mask(exp) if expert_mask is not None else None
            for batch in shard_loader(exp.test, batch_size or self.batch_size):
                x, y = batch[0].to(device), batch[1].to(device)
                logits, aux = forward(model, x, mask)
                scores.update(logits, y)
                routing.add(aux, len(y))
            rows.append(scores.compute())
            routing.end_experience()
            now = time.perf_counter()
            if now - last >= PROGRESS_S:  # only long evaluations print; outcomes never depend on it
                last = now
                LOGGER.info(
                    f"evaluating: {j + 1}/{len(stream.experiences)} {self.unit} "
                    f"in {now - start:.0f}s"
                )
        model.train(was_training)
        return self.evaluation(stream, rows, routing)


class Accuracies:
    """Class-IL and task-IL accuracy of one experience through torchmetrics, which sums the
    ranks' counts in ``compute`` (its default ``sync_on_compute``)."""

    def __init__(self, stream: Stream, exp: Experience, device: str | torch.device) -> None:
        self.overall = MulticlassAccuracy(stream.n_classes, average="micro").to(device)
        self.within_task = MulticlassAccuracy(stream.n_classes, average="micro").to(device)
        self.task_mask = torch.full((stream.n_classes,), float("-inf"), device=device)
        self.task_mask[exp.classes] = 0.0

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        if len(y):  # an empty batch keeps the ranks in step (shard.py); torchmetrics refuses it
            self.overall.update(logits, y)
            self.within_task.update(logits + self.task_mask, y)

    def compute(self) -> tuple[float, float]:
        return self.overall.compute().item(), self.within_task.compute().item()


class ClassificationEvaluator(Evaluator):
    """Accuracy on every test experience; task-IL accuracy too when the stream has task labels."""

    def scores(self, stream: Stream, exp: Experience, device: str | torch.device) -> Accuracies:
        return Accuracies(stream, exp, device)

    def evaluation(
        self, stream: Stream, rows: list[tuple[float, ...]], routing: RoutingCounts
    ) -> Evaluation:
        return Evaluation(
            accuracy=[row[0] for row in rows],
            accuracy_task=[row[1] for row in rows] if stream.task_labels else None,
            routing=routing.by_layer(),
            routing_stats=routing.stats_by_layer(),
        )


evaluate = ClassificationEvaluator()
