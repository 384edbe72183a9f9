"""Every read of the tracking store: find a run, read its config, state, matrices and metrics.

Resume, compare, the sweep's parent run and experiments/ ask here, so the filter strings and
artifact paths that depend on the layout written by :mod:`lifelong_moe.tracking.mlflow_run` are
spelled once (through :mod:`lifelong_moe.names`). Functions take a client from
:func:`lifelong_moe.tracking.store.client` and return plain values; refusing a run is the
caller's business (resume's checks, compare's errors).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from lifelong_moe import names

EXPERIMENT_RUNS = f"tags.{names.TAG_KIND} = '{names.KIND_EXPERIMENT}'"
UNFINISHED = "attributes.status != 'FINISHED'"


def experiment_id(client: MlflowClient, name: str) -> str | None:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else None


def experiment_name(client: MlflowClient, experiment_id: str) -> str:
    return client.get_experiment(experiment_id).name


def get_run(client: MlflowClient, run_id: str) -> Run | None:
    """The run, or None when the store has no run of that id."""
    try:
        return client.get_run(run_id)
    except Exception:  # MLflow raises its own "not found" (or a bad id format) error
        return None


def run_tag(client: MlflowClient, run_id: str, name: str) -> str | None:
    return client.get_run(run_id).data.tags.get(name)


def newest_run(client: MlflowClient, experiment: str, *clauses: str) -> str | None:
    """The most recently started experiment run matching every clause, or None."""
    found = experiment_id(client, experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found],
        filter_string=" and ".join([EXPERIMENT_RUNS, *clauses]),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def newest_unfinished(client: MlflowClient, experiment: str) -> str | None:
    """``resume=last``: the newest experiment run that did not finish."""
    return newest_run(client, experiment, UNFINISHED)


def requeued_run(client: MlflowClient, experiment: str, job: str) -> str | None:
    """The unfinished run that SLURM job ``job`` started before it was requeued, if any."""
    return newest_run(client, experiment, f"tags.{names.TAG_SLURM_JOB} = '{job}'", UNFINISHED)


def sweep_parent(client: MlflowClient, experiment_id: str, sweep_id: str) -> str | None:
    """The run id of a sweep's parent run (kind=sweep, its sweep_id), None if it has none."""
    found = client.search_runs(
        [experiment_id],
        f"tags.{names.TAG_KIND} = '{names.KIND_SWEEP}' and tags.{names.TAG_SWEEP_ID} = '{sweep_id}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def sweep_runs(client: MlflowClient, experiment_id: str, sweep_id: str) -> list[Run]:
    """The experiment runs of one sweep, whatever their status."""
    clause = f"{EXPERIMENT_RUNS} and tags.{names.TAG_SWEEP_ID} = '{sweep_id}'"
    return search_runs(client, [experiment_id], clause)


def search_runs(
    client: MlflowClient, experiment_ids: Sequence[str], filter_string: str
) -> list[Run]:
    """Every matching run, following MLflow's pages."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            list(experiment_ids), filter_string, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def download(client: MlflowClient, run_id: str, path: str, folder: str | Path) -> Path | None:
    """Download one artifact into ``folder``; None when the run has no such artifact."""
    try:
        return Path(client.download_artifacts(run_id, path, str(folder)))
    except Exception:  # MLflow raises different errors per store for a missing artifact
        return None


def read_text(client: MlflowClient, run_id: str, path: str) -> str | None:
    """A text artifact's content, None when missing."""
    with tempfile.TemporaryDirectory() as tmp:
        local = download(client, run_id, path, tmp)
        return local.read_text() if local else None


def read_json(client: MlflowClient, run_id: str, path: str) -> Any | None:
    """A JSON artifact's content, None when missing."""
    text = read_text(client, run_id, path)
    return json.loads(text) if text is not None else None


def run_config_text(client: MlflowClient, run_id: str) -> str | None:
    """The resolved config a run started with (YAML), None when it has none."""
    return read_text(client, run_id, names.CONFIG)


def resume_state_file(client: MlflowClient, run_id: str, folder: str | Path) -> Path | None:
    """Download the run's resume state (today's path, else the one before issue 13)."""
    for where in (names.RESUME_STATE, names.LEGACY_RESUME_STATE):
        local = download(client, run_id, where, folder)
        if local:
            return local
    return None


# Where each matrix kind's end-of-stream matrix lives in a run, and its key in that JSON.
MATRICES = {
    names.MATRIX_ACCURACY: (names.ACCURACY_MATRIX, "R"),
    names.MATRIX_PERPLEXITY: (names.PERPLEXITY_MATRIX, "perplexity"),
}


def matrix(client: MlflowClient, run_id: str, kind: str) -> list[list[float]] | None:
    """The run's final matrix of ``kind`` (accuracy R, or perplexity), None when missing."""
    path, key = MATRICES[kind]
    data = read_json(client, run_id, path)
    return data[key] if data else None


def logged_steps(client: MlflowClient, run_id: str, key: str) -> set[int]:
    """The steps at which a metric was logged (resume: which experiences reached MLflow)."""
    return {m.step for m in client.get_metric_history(run_id, key)}


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    """A per-experience metric as a list indexed by step (NaN where a step is missing).

    A run logged before the metric rename (issue 13) is read under the key's old name; a
    step logged twice (a resumed run) keeps its latest value.
    """
    points = client.get_metric_history(run_id, key)
    if not points and (old := names.legacy_name(key)):
        points = client.get_metric_history(run_id, old)
    points = sorted(points, key=lambda m: (m.step, m.timestamp))
    if not points:
        return []
    values = [math.nan] * (points[-1].step + 1)
    for m in points:
        values[m.step] = m.value
    return values
