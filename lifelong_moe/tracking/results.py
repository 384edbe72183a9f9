"""The artifacts a finished run leaves in MLflow: matrices, tables, plots, summary, description.

Written once, after the last experience, from the matrices the loop accumulated. Paths come
from :mod:`lifelong_moe.names`; the description is what the run's page shows first.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lifelong_moe import names
from lifelong_moe.evaluation.plots import plot_matrix, plot_routing
from lifelong_moe.stream import Stream
from lifelong_moe.tracking import report
from lifelong_moe.tracking.mlflow_run import RunTracker


def routing_record(routing: Sequence, origin: Sequence[int]) -> dict[str, Any]:
    """Final routing shares plus which experience created each expert (for grouping in the plot)."""
    layers = [f"layer_{k}" for k in range(len(routing[-1]))]
    return {
        "layers": dict(zip(layers, routing[-1], strict=True)),
        "expert_origin": list(origin),
        "per_experience": [dict(zip(layers, r, strict=True)) for r in routing],
    }


def log_results(
    tracker: RunTracker,
    run: Mapping[str, str],
    stream: Stream,
    final: Mapping[str, float],
    *,
    R: list,
    b: list,
    R_task: list | None = None,
    b_task: list | None = None,
    L: list | None = None,
    b_loss: list | None = None,
    routing: list | None = None,
    origin: Sequence[int] = (),
) -> None:
    """Log every end-of-run artifact; ``run`` holds the method, benchmark, model and seed."""
    experiences = [
        {"index": e.index, "classes": e.classes, "task": e.task_id} for e in stream.experiences
    ]
    matrix: dict[str, Any] = {"R": R, "b": b, "experiences": experiences}
    if R_task:
        matrix |= {"R_task": R_task, "b_task": b_task}
    tracker.log_json(matrix, names.ACCURACY_MATRIX)
    til = {"accuracy_til": R_task} if R_task else {}
    tracker.log_table(report.matrix_table("accuracy", R, **til), names.ACCURACY_TABLE)
    title = f"{run[names.TAG_METHOD]} on {stream.name}"
    perplexity = np.exp(np.array(L)).tolist() if L else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / names.ACCURACY_PLOT
        plot_matrix(np.array(R), path, title=f"{title}: accuracy R[i][j]")
        tracker.log_file(path)
        if L:
            data = {"L": L, "perplexity": perplexity, "b_loss": b_loss, "domains": experiences}
            tracker.log_json(data, names.PERPLEXITY_MATRIX)
            table = report.matrix_table("perplexity", perplexity, loss=L)
            tracker.log_table(table, names.PERPLEXITY_TABLE)
            path = Path(tmp) / names.PERPLEXITY_PLOT
            plot_matrix(np.array(perplexity), path, title=f"{title}: perplexity")
            tracker.log_file(path)
        if routing and routing[-1]:
            record = routing_record(routing, origin)
            tracker.log_json(record, names.ROUTING_JSON)
            tracker.log_table(report.routing_table(record), names.ROUTING_TABLE)
            path = Path(tmp) / names.ROUTING_PLOT
            plot_routing(record, path)
            tracker.log_file(path)
    tracker.describe(report.description(run, R, dict(final), perplexity))
