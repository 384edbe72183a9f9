"""A sweep's parent run: created before any job, finished after the last, holding the comparison.

The launching process of ``lifelong-moe -m`` (see :mod:`lifelong_moe.tracking.hydra_callback`)
opens the parent (``kind=sweep``, RUNNING) before the launcher starts a job, so there is exactly
one per sweep whatever the launcher (basic, joblib, submitit) or store (sqlite, http, PostgreSQL);
jobs find it by their ``sweep_id`` tag and nest under it. When the sweep ends, or the launching
process exits because a job failed, the parent is finished with what ``lifelong-moe-compare``
computes for its runs (:func:`lifelong_moe.tracking.comparison.record`) and a status that says whether every
job finished.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from lifelong_moe import compat, names
from lifelong_moe.log import LOGGER
from lifelong_moe.tracking import comparison, queries, store
from lifelong_moe.tracking.comparison_plots import plot_matrices, write_plots
from lifelong_moe.tracking.store import check_store

GROUP_BY = [names.TAG_METHOD, names.TAG_BENCHMARK]
# The parent's own colour in the UI's charts: a neutral grey, so that it never takes a child's.
RUN_COLOR_TAG, PARENT_COLOR = names.TAG_RUN_COLOR, "#7F7F7F"
PARENT_PREFIX = names.SWEEP
UNSAFE = re.compile(r"[^\w.\- ]")  # characters MLflow refuses in a metric name
# Overrides that would put a sweep's runs into several stores or experiments: no single parent.
SPLITTING = ("tracking.uri", "tracking.experiment", "tracking.sweep_id", "experiment")


def sweep_id_from_dir(sweep_dir: str) -> str:
    """Every job of one sweep shares Hydra's sweep directory: it names the sweep."""
    return str(Path(str(sweep_dir))).replace("/", "_")


def expected_jobs(config: DictConfig) -> int | None:
    """How many jobs Hydra's basic sweeper makes of the overrides (None for other sweepers)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides(
            params + list(config.hydra.overrides.task)
        )
        (batch,) = compat.split_sweep(overrides)
    except Exception:  # a sweep syntax that needs the config loader (glob): count unknown
        return None
    return len(batch)


def parent_metric(metric: str, label: str) -> str:
    """``sweep/acc/final/naive``: a method's mean of ``metric`` in the parent's own chart section
    (sorted by metric, so one metric's charts for all methods sit side by side)."""
    return f"{PARENT_PREFIX}/{metric}/{UNSAFE.sub('_', label)}"


def parent_metrics(client: MlflowClient, groups: Sequence[comparison.Group]) -> list[Metric]:
    """Per group (method, or method.benchmark when the sweep has several): the mean over its
    runs of the final and forgetting metrics (step 0) and of the seen-so-far curve (step =
    experience). Without them a collapsed sweep leaves the UI's chart view empty."""
    now = int(time.time() * 1000)
    several = len({g.key[1:] for g in groups}) > 1
    table = comparison.summary(groups)
    found = []
    for i, g in enumerate(groups):
        if g.matrix not in comparison.CURVE:
            continue
        label = ".".join(g.key) if several else g.key[0]
        for metric in (comparison.QUALITY[g.matrix][0], comparison.BARS[g.matrix]):
            mean, _, n = comparison.stats(table, i, metric)
            if n:
                found.append(Metric(parent_metric(metric, label), mean, now, 0))
        curve = comparison.CURVE[g.matrix]
        histories = [queries.metric_history(client, r.run_id, curve) for r in g.runs]
        for step in range(max(map(len, histories), default=0)):
            values = [h[step] for h in histories if step < len(h) and not math.isnan(h[step])]
            if values:
                found.append(
                    Metric(parent_metric(curve, label), sum(values) / len(values), now, step)
                )
    return found


def swept_keys(config: DictConfig) -> list[str]:
    """The keys that take several values in this sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    except Exception:
        return []
    return [o.get_key_element() for o in overrides if o.is_sweep_override()]


class SweepParent:
    """The parent run of one sweep in one experiment of one store."""

    def __init__(
        self, uri: str, experiment: str, sweep_id: str, expected: int | None = None
    ) -> None:
        self.uri, self.experiment, self.sweep_id, self.expected = (
            uri,
            experiment,
            sweep_id,
            expected,
        )
        self.client = store.client(uri)
        self.experiment_id = ""
        self.run_id = ""
        self.status = ""

    def open(self) -> str:
        """Create the parent, RUNNING, before any job exists; returns its run id."""
        self.experiment_id = store.open_experiment(self.client, self.uri, self.experiment)
        tags = {
            names.TAG_KIND: names.KIND_SWEEP,
            names.TAG_SWEEP_ID: self.sweep_id,
            RUN_COLOR_TAG: PARENT_COLOR,
        }
        if self.expected is not None:
            tags[names.TAG_SWEEP_RUNS_EXPECTED] = str(self.expected)
        run = self.client.create_run(
            self.experiment_id, run_name=f"sweep {self.sweep_id}", tags=tags
        )
        self.run_id = run.info.run_id
        return self.run_id

    def children(self) -> list:
        """The sweep's runs, whatever their status."""
        return queries.sweep_runs(self.client, self.experiment_id, self.sweep_id)

    def close(self) -> str:
        """Record the comparison of the finished runs and end the parent; returns its status.

        FINISHED when every expected job left a FINISHED run; KILLED when a run was interrupted
        and none failed; FAILED otherwise. ``sweep.runs_finished`` ("3/4") says how many made it.
        Calling it again does nothing.
        """
        if self.status or not self.run_id:
            return self.status
        runs = self.children()
        done = [r for r in runs if r.info.status == "FINISHED"]
        total = max(self.expected or 0, len(runs))
        statuses = [r.info.status for r in runs]
        if len(done) == total and total > 0:
            status = "FINISHED"
        elif "KILLED" in statuses and "FAILED" not in statuses:
            status = "KILLED"
        else:
            status = "FAILED"
        tags = {
            names.TAG_SWEEP_RUNS_FINISHED: f"{len(done)}/{total}",
            names.TAG_SWEEP_RUNS_FAILED: str(statuses.count("FAILED")),
            names.TAG_SWEEP_RUNS_KILLED: str(statuses.count("KILLED")),
        }
        summary = f"**Sweep `{self.sweep_id}`**: {len(done)} of {total} runs finished"
        if status != "FINISHED":
            summary += f" (status {status}: the table covers the finished runs only)"
        summary += ".\n"
        if done:
            records = [comparison.record_of(r) for r in done]
            groups = comparison.group_runs(records, GROUP_BY)
            summary += (
                f"Charts: `{PARENT_PREFIX}/<metric>/<method>`, each method's mean over its seeds.\n"
            )
            meta = {
                "experiments": [self.experiment],
                "filter": f"tags.{names.TAG_SWEEP_ID} = '{self.sweep_id}' "
                "AND attributes.status = 'FINISHED'",
                "group_by": GROUP_BY,
                "n_runs": len(records),
            }
            with tempfile.TemporaryDirectory() as tmp:
                plots = write_plots(self.client, groups, Path(tmp))
                plots += plot_matrices(self.client, groups, Path(tmp))
                comparison.record(self.client, self.run_id, groups, GROUP_BY, meta, plots, summary)
            metrics = parent_metrics(self.client, groups)
            for i in range(0, len(metrics), 500):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + 500])
        else:
            tags[names.TAG_DESCRIPTION] = summary
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.run_id, status)
        self.status = status
        return status

    def hint(self) -> str:
        return store.ui_hint(self.uri, self.experiment_id, self.run_id)


def open_parent(config: DictConfig) -> SweepParent | None:
    """The parent for the sweep that ``config`` (Hydra's multirun config) is about to launch.

    None when the sweep spreads its runs over several stores or experiments (a swept
    ``tracking.uri``, ``tracking.experiment`` or ``experiment`` preset): no single run can hold
    them. Raises ConfigError when the store cannot be used.
    """
    split = [k for k in swept_keys(config) if k in SPLITTING]
    if split:
        LOGGER.info(f"note: {', '.join(split)} is swept, so this sweep gets no parent run")
        return None
    tracking = config.tracking
    check_store(tracking.uri)
    sweep_id = tracking.get("sweep_id") or sweep_id_from_dir(config.hydra.sweep.dir)
    parent = SweepParent(tracking.uri, tracking.experiment, str(sweep_id), expected_jobs(config))
    parent.open()
    return parent
