"""Evaluate a model on every test experience: class-IL and task-IL accuracy, and routing shares.

One pass per test experience in large batches; accuracy through torchmetrics. The routing
statistics come from the MoE layers' own token counts, so they cost nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lifelong_moe.data.stream import Experience, Stream


@dataclass
class Evaluation:
    """One row of the accuracy matrices and the routing shares after one experience."""

    accuracy: list[float]
    accuracy_task: list[float] | None = None
    # routing[layer][j] = share of test experience j's (token, slot) assignments per expert
    routing: list[list[list[float]]] = field(default_factory=list)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    stream: Stream,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    expert_mask: Callable[[Experience], torch.Tensor | None] | None = None,
) -> Evaluation:
    """Accuracy of ``model`` on each of the stream's test experiences (all of them, also future).

    ``expert_mask`` gives the MoE expert mask for a test experience: task-aware routing, where
    the task label (known at test time in task-IL) picks the experts.
    """
    was_training = model.training
    model.eval()
    accuracy, accuracy_task, routing = [], [], []
    for exp in stream.experiences:
        overall = MulticlassAccuracy(stream.n_classes, average="micro").to(device)
        within_task = MulticlassAccuracy(stream.n_classes, average="micro").to(device)
        task_mask = torch.full((stream.n_classes,), float("-inf"), device=device)
        task_mask[exp.classes] = 0.0
        counts: list[torch.Tensor] = []
        for batch in DataLoader(exp.test, batch_size=batch_size):
            x, y = batch[0].to(device), batch[1].to(device)
            mask = expert_mask(exp) if expert_mask is not None else None
            logits, aux = model(x) if mask is None else model(x, expert_mask=mask)
            overall.update(logits, y)
            within_task.update(logits + task_mask, y)
            if not counts:
                counts = [a.tokens_per_expert.double() for a in aux]
            else:
                counts = [c + a.tokens_per_expert for c, a in zip(counts, aux, strict=True)]
        accuracy.append(overall.compute().item())
        accuracy_task.append(within_task.compute().item())
        routing.append([(c / c.sum().clamp_min(1)).tolist() for c in counts])
    model.train(was_training)
    # routing[j][layer] -> routing[layer][j]
    by_layer = (
        [list(layer) for layer in zip(*routing, strict=True)] if routing and routing[0] else []
    )
    return Evaluation(
        accuracy=accuracy,
        accuracy_task=accuracy_task if stream.task_labels else None,
        routing=by_layer,
    )
