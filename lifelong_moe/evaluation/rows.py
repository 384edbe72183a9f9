"""The metrics logged after each experience and at the end of the stream, as pure functions.

A row is a dict of metric name -> value, computed from the matrices the loop has accumulated
(accuracy R, task-IL accuracy, language-model loss L, routing shares); the runner logs it with
step = experience index. Names come from :mod:`lifelong_moe.names`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lifelong_moe import names
from lifelong_moe.evaluation import metrics
from lifelong_moe.evaluation.routing import routing_metrics

Matrix = Sequence[Sequence[float]]


def matrix_row(i: int, family: str, R: Matrix) -> dict[str, float]:
    """Row i of an accuracy matrix and what follows from it (family ``acc`` or ``acc_til``)."""
    Ri = np.array(R)
    out = {names.exp_metric(family, j): v for j, v in enumerate(R[i])}
    out[names.summary(family, "seen")] = metrics.average_accuracy(Ri, i)
    out[names.summary(family, "forgetting")] = metrics.forgetting(Ri, i)
    out[names.summary(family, "bwt")] = metrics.bwt(Ri, i)
    return out


def quality_row(
    i: int,
    R: Matrix,
    R_task: Matrix | None = None,
    L: Matrix | None = None,
    routing: Sequence | None = None,
    origin: Sequence[int] = (),
    routing_stats: Sequence = (),
) -> dict[str, float]:
    """Everything known about quality after experience i: accuracy (and task-IL accuracy),
    perplexity for language models, routing statistics for MoE models."""
    row = matrix_row(i, names.ACC, R)
    if routing and routing[-1]:
        row |= routing_metrics(routing, origin, i, routing_stats)
    if R_task:
        row |= matrix_row(i, names.ACC_TIL, R_task)
    if L:
        row |= {names.exp_metric(names.LOSS, j): v for j, v in enumerate(L[i])}
        row |= {names.exp_metric(names.PPL, j): math.exp(v) for j, v in enumerate(L[i])}
        row[names.PPL_SEEN] = metrics.average_perplexity(np.array(L), i)
    return row


def final_metrics(
    R: Matrix,
    b: Sequence[float],
    R_task: Matrix | None = None,
    b_task: Sequence[float] | None = None,
    L: Matrix | None = None,
) -> dict[str, float]:
    """End-of-stream metrics: accuracy's (and task-IL's) summary, and perplexity's."""
    final = metrics.summarize(np.array(R), np.array(b))
    if R_task:
        til = metrics.summarize(np.array(R_task), np.array(b_task))
        prefix = names.ACC + "/"
        final |= {f"{names.ACC_TIL}/{k.removeprefix(prefix)}": v for k, v in til.items()}
    if L:
        final |= metrics.summarize_loss(np.array(L))
    return final
