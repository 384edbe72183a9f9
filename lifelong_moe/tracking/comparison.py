"""Compare finished runs over seeds: group them, aggregate with pandas, render the tables.

Reads the layout that :mod:`lifelong_moe.tracking.mlflow_run` writes (one run per method,
benchmark and seed; tags ``kind``, ``matrix``; end-of-stream metrics at the last step). Runs are
grouped by (matrix kind, group-by values) and every table (markdown, csv, json, the MLflow table,
the verdict) reads one aggregate, :func:`summary`: mean, sample std and n per group and metric,
from ``DataFrame.groupby().agg``. Accuracy and perplexity runs never share a table: their
columns mean different things. Language-model runs that ran lm-eval tasks also get each task's
``downstream/<task>/<metric>`` after the last experience as a quality column (paired intervals
of ``--reference`` included).

``lifelong-moe-compare`` (:mod:`lifelong_moe.compare`) is the command-line face of this module;
a sweep's parent run (:mod:`lifelong_moe.tracking.sweep`) records the same comparison.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from lifelong_moe import names
from lifelong_moe.errors import ConfigError
from lifelong_moe.evaluation.metrics import mean_std
from lifelong_moe.evaluation.stats import paired_interval
from lifelong_moe.tracking import queries, store

# Columns per matrix kind: the end-of-stream quality metrics, then the costs.
QUALITY = {
    names.MATRIX_ACCURACY: [
        names.ACC_FINAL,
        names.ACC_AVG_INCREMENTAL,
        names.ACC_FORGETTING,
        names.ACC_BWT,
        names.ACC_FWT,
    ],
    names.MATRIX_PERPLEXITY: [names.PPL_FINAL, names.PPL_FORGETTING, names.LOSS_BWT],
}
# Routing metrics (MoE runs only; "-" elsewhere), beside the forgetting they may explain.
# routing/max_imbalance is the pooled pre-issue-24 metric: shown under its own name for old runs,
# never merged with the per-distribution MRI (routing/mri_max).
ROUTING = [
    names.ROUTING_SPECIALIZATION,
    names.ROUTING_SPECIALIZATION_CORRECTED,
    names.ROUTING_DRIFT,
    names.ROUTING_TOKEN_DRIFT,
    names.ROUTING_MRI_MAX,
    names.ROUTING_INFERENCE_ACC,
    names.ROUTING_MAX_IMBALANCE,
]
COSTS = [
    names.COST_PARAMS_TOTAL,
    names.COST_PARAMS_TRAINABLE,
    names.COST_PARAMS_ACTIVE,
    names.COST_TRAIN_TOTAL_S,
]
# Per-experience metrics behind the plots: the seen-so-far curve and the forgetting bars.
CURVE = {names.MATRIX_ACCURACY: names.ACC_SEEN, names.MATRIX_PERPLEXITY: names.PPL_SEEN}
BARS = {names.MATRIX_ACCURACY: names.ACC_FORGETTING, names.MATRIX_PERPLEXITY: names.PPL_FORGETTING}
# The aggregate table as MLflow shows tables (``MlflowClient.log_table``).
TABLE_ARTIFACT = names.COMPARISON_TABLE
STATS = ("mean", "std", "n")


class StoreError(RuntimeError):
    """The store cannot be read, or holds nothing that matches: one line, exit status 2."""


@dataclass
class RunRecord:
    run_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]

    @property
    def matrix(self) -> str:
        """Matrix kind from the tag; runs from before the tag existed are told by their metrics."""
        kind = self.tags.get(names.TAG_MATRIX)
        if kind:
            return kind
        return names.MATRIX_PERPLEXITY if names.PPL_FINAL in self.metrics else names.MATRIX_ACCURACY

    def lookup(self, key: str) -> str | None:
        """A group-by key: ``tags.x``, ``params.x``, or a bare name (a tag, else a param)."""
        prefix, _, rest = key.partition(".")
        if prefix in ("tags", "tag") and rest:
            return self.tags.get(rest)
        if prefix in ("params", "param") and rest:
            return self.params.get(names.modern_key(rest))
        return self.tags.get(key, self.params.get(names.modern_key(key)))


@dataclass
class Group:
    """The runs that share a matrix kind and the group-by values ``key``."""

    matrix: str
    key: tuple[str, ...]
    runs: list[RunRecord] = field(default_factory=list)


# --- reading the store --------------------------------------------------------------------------


def search(client: MlflowClient, experiments: Sequence[str], filter_string: str) -> list[RunRecord]:
    """All runs of the named experiments that match."""
    ids = []
    for name in experiments:
        found = queries.experiment_id(client, name)
        if found is None:
            raise StoreError(f"no experiment named {name!r} in the store")
        ids.append(found)
    return [record_of(run) for run in queries.search_runs(client, ids, filter_string)]


def record_of(run) -> RunRecord:
    """An MLflow run as a record; runs logged before the metric rename (issue 13) and the config
    key renames (issue 21) read under today's names."""
    params = names.modernize_params(run.data.params)
    return RunRecord(run.info.run_id, run.data.tags, params, names.modernize(run.data.metrics))


# --- grouping and the aggregate -----------------------------------------------------------------


def group_runs(runs: Sequence[RunRecord], group_by: Sequence[str]) -> list[Group]:
    """Groups by (matrix kind, group-by values), sorted; a key no run has is a user mistake."""
    for key in group_by:
        if all(r.lookup(key) is None for r in runs):
            raise ConfigError(f"--group-by {key}: no matching run has a tag or param of that name")
    keys = [f"key {i}" for i in range(len(group_by))]  # group-by names may clash with "matrix"
    frame = pd.DataFrame(
        [[r.matrix, *(r.lookup(k) or "-" for k in group_by)] for r in runs],
        columns=["matrix", *keys],
    )
    return [
        Group(values[0], tuple(values[1:]), [runs[i] for i in part.index])
        for values, part in frame.groupby(["matrix", *keys], sort=True)
    ]


def downstream_columns(groups: Sequence[Group], matrix: str) -> list[str]:
    """``downstream/<task>/<metric>`` that any run of kind ``matrix`` logged, sorted.

    lm-eval runs after experiences and always after the last (evaluation/downstream.py), at
    step = experience, so a run's latest value of each is its score after the last experience.
    Standard errors are left out: their mean over seeds says nothing the spread does not.
    """
    prefix = names.DOWNSTREAM + "/"
    return sorted(
        {
            key
            for g in groups
            if g.matrix == matrix
            for r in g.runs
            for key in r.metrics
            if key.startswith(prefix) and not key.endswith("_stderr")
        }
    )


def quality(matrix: str, groups: Sequence[Group] = ()) -> list[str]:
    """The end-of-stream quality columns of a kind: its matrix metrics, then downstream tasks."""
    return QUALITY.get(matrix, []) + downstream_columns(groups, matrix)


def columns(matrix: str, groups: Sequence[Group] = ()) -> list[str]:
    return quality(matrix, groups) + ROUTING + COSTS


def all_columns(groups: Sequence[Group]) -> list[str]:
    """Every kind's columns, kinds in sorted order, each metric once."""
    kinds = sorted({g.matrix for g in groups})
    return list(dict.fromkeys(c for k in kinds for c in columns(k, groups)))


def _mean(values: pd.Series) -> float:
    return mean_std(values)[0]


def _std(values: pd.Series) -> float:
    return mean_std(values)[1]


def _n(values: pd.Series) -> int:
    return mean_std(values)[2]


def summary(groups: Sequence[Group]) -> pd.DataFrame:
    """Row i is ``groups[i]``; columns (metric, "mean" | "std" | "n") over its runs.

    pandas groups; the arithmetic is ``evaluation.metrics.mean_std``'s, as in every plot: NaN (a
    metric a run did not log) left out, the sample std (ddof=1), 0.0 over a single run. (pandas'
    own mean and std sum in another order and differ in the last bits, which can flip a rounded
    digit in the tables.)
    """
    metrics = all_columns(groups)
    frame = pd.DataFrame(
        [
            [i, *(r.metrics.get(m, math.nan) for m in metrics)]
            for i, g in enumerate(groups)
            for r in g.runs
        ],
        columns=["group", *metrics],
    ).astype(dict.fromkeys(metrics, float))
    table = frame.groupby("group")[metrics].agg([_mean, _std, _n])
    table = table.rename(columns={"_mean": "mean", "_std": "std", "_n": "n"}, level=1)
    return table.reindex(range(len(groups)))


def stats(table: pd.DataFrame, row: int, metric: str) -> tuple[float, float, int]:
    """(mean, std, n) of one group and metric; (nan, nan, 0) for a metric no run logged."""
    if (metric, "n") not in table.columns or pd.isna(table.at[row, (metric, "n")]):
        return math.nan, math.nan, 0  # a metric of another kind, or a group without runs
    mean, std, n = (table.at[row, (metric, s)] for s in STATS)
    return float(mean), float(std), int(n)


# --- tables -------------------------------------------------------------------------------------


def _fmt(metric: str, mean: float, std: float, n: int) -> str:
    """``mean ± std``; with one value (n = 1) there is no spread, so the mean alone."""
    if n == 0 or math.isnan(mean):
        return "-"
    if metric.startswith(names.cost_params("")):
        number = "{:,.0f}"
    elif metric.startswith(names.COST + "/"):
        number = "{:.1f}"
    else:
        number = "{:.3f}"
    if n == 1:
        return number.format(mean)
    return f"{number.format(mean)} ± {number.format(std)}"


def to_markdown(groups: Sequence[Group], group_by: Sequence[str]) -> str:
    """One table per matrix kind, mean ± std over seeds; n counts the runs in a group."""
    table = summary(groups)
    kinds = sorted({g.matrix for g in groups})
    parts = []
    for kind in kinds:
        cols = columns(kind, groups)
        header = [*group_by, "n", *cols]
        lines = [
            "| " + " | ".join(header) + " |",
            "|"
            + "|".join("---" if i < len(group_by) else "---:" for i in range(len(header)))
            + "|",
        ]
        for i, g in enumerate(groups):
            if g.matrix != kind:
                continue
            cells = [*g.key, str(len(g.runs))]
            cells += [_fmt(c, *stats(table, i, c)) for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        title = [f"### {kind}", ""] if len(kinds) > 1 else []
        parts.append("\n".join(title + lines))
    return "\n\n".join(parts) + "\n"


def to_csv(groups: Sequence[Group], group_by: Sequence[str]) -> str:
    """Full precision: ``<metric>_mean`` and ``<metric>_std`` per metric; empty where missing."""
    table, cols = summary(groups), all_columns(groups)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["matrix", *group_by, "n", *(f"{c}_{s}" for c in cols for s in ("mean", "std"))]
    )
    for i, g in enumerate(groups):
        row = [g.matrix, *g.key, len(g.runs)]
        for c in cols:
            mean, std, n = stats(table, i, c)
            row += ["", ""] if n == 0 else [repr(round(mean, 10)), repr(round(std, 10))]
        writer.writerow(row)
    return buffer.getvalue()


def to_records(groups: Sequence[Group], group_by: Sequence[str]) -> list[dict]:
    """JSON rows: group values, n, run ids, and per metric mean/std/n (its own n: runs that
    logged it). NaN becomes null."""
    table = summary(groups)
    rows = []
    for i, g in enumerate(groups):
        metrics = {}
        for c in columns(g.matrix, groups):
            mean, std, n = stats(table, i, c)
            metrics[c] = {"mean": None if n == 0 else mean, "std": None if n == 0 else std, "n": n}
        rows.append(
            {
                "matrix": g.matrix,
                **dict(zip(group_by, g.key, strict=True)),
                "n": len(g.runs),
                "run_ids": [r.run_id for r in g.runs],
                "metrics": metrics,
            }
        )
    return rows


def table_data(groups: Sequence[Group], group_by: Sequence[str]) -> dict[str, list]:
    """The aggregate as columns for ``MlflowClient.log_table``: one row per group, mean/std/n."""
    table, cols = summary(groups), all_columns(groups)
    data: dict[str, list] = {k: [] for k in [*group_by, "matrix", "n"]}
    for c in cols:
        data[f"{c} mean"], data[f"{c} std"] = [], []
    for i, g in enumerate(groups):
        for key, value in zip(group_by, g.key, strict=True):
            data[key].append(value)
        data["matrix"].append(g.matrix)
        data["n"].append(len(g.runs))
        for c in cols:
            mean, std, n = stats(table, i, c)
            data[f"{c} mean"].append(None if n == 0 else round(mean, 6))
            data[f"{c} std"].append(None if n == 0 else round(std, 6))
    return data


def paired_records(groups: Sequence[Group], group_by: Sequence[str], reference: str) -> list[dict]:
    """Per group and quality metric: the 95 % paired t interval of (group - reference) over the
    seeds both ran (evaluation/stats.py); the reference is the group with ``method`` = reference
    and the same other group values and matrix kind."""
    if "method" not in group_by:
        raise ConfigError(f"--reference {reference}: needs method in --group-by, got {group_by}")
    at = list(group_by).index("method")
    if not any(g.key[at] == reference for g in groups):
        raise ConfigError(f"--reference {reference}: no matching run has method={reference}")

    def by_seed(g: Group, metric: str) -> dict[int, float]:
        return {
            int(r.tags[names.TAG_SEED]): r.metrics.get(metric, math.nan)
            for r in g.runs
            if r.tags.get(names.TAG_SEED, "").lstrip("-").isdigit()
        }

    refs = {(g.matrix, g.key[:at] + g.key[at + 1 :]): g for g in groups if g.key[at] == reference}
    out = []
    for g in groups:
        ref = refs.get((g.matrix, g.key[:at] + g.key[at + 1 :]))
        if ref is None or ref is g:
            continue
        metrics = {}
        for metric in quality(g.matrix, groups):
            ci = paired_interval(by_seed(g, metric), by_seed(ref, metric))
            metrics[metric] = {"mean": ci.mean, "low": ci.low, "high": ci.high, "n": ci.n}
        out.append(
            {"matrix": g.matrix, **dict(zip(group_by, g.key, strict=True)), "metrics": metrics}
        )
    return out


def paired_markdown(records: Sequence[dict], group_by: Sequence[str], reference: str) -> str:
    """``+0.012 [-0.003, +0.027] (5)``: mean difference from the reference, 95 % paired t
    interval, paired seeds; ``-`` where no seed pairs."""
    parts = []
    for kind in sorted({r["matrix"] for r in records}):
        cols = list(dict.fromkeys(c for r in records if r["matrix"] == kind for c in r["metrics"]))
        lines = [
            f"Difference from {reference} ({kind}), mean over paired seeds [95 % paired t CI] (n):",
            "",
            "| " + " | ".join([*group_by, *cols]) + " |",
            "|" + "|".join(["---"] * len(group_by) + ["---:"] * len(cols)) + "|",
        ]
        for r in (r for r in records if r["matrix"] == kind):
            cells = [r[k] for k in group_by]
            for c in cols:
                m = r["metrics"][c]
                if m["n"] == 0:
                    cells.append("-")
                elif m["n"] == 1:
                    cells.append(f"{m['mean']:+.3f} (1)")
                else:
                    cells.append(f"{m['mean']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}] ({m['n']})")
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def render(
    groups: Sequence[Group],
    group_by: Sequence[str],
    fmt: str,
    meta: dict,
    reference: str | None = None,
) -> str:
    paired = paired_records(groups, group_by, reference) if reference else None
    if fmt == "csv":
        if reference:
            raise ConfigError("--reference: paired intervals are shown in md and json, not csv")
        return to_csv(groups, group_by)
    if fmt == "json":
        body = {**meta, "rows": to_records(groups, group_by)}
        if paired is not None:
            body |= {"reference": reference, "paired": paired}
        return json.dumps(body, indent=2) + "\n"
    table = to_markdown(groups, group_by)
    return table if paired is None else table + "\n" + paired_markdown(paired, group_by, reference)


def verdict(groups: Sequence[Group], group_by: Sequence[str]) -> list[str]:
    """One line per benchmark (or per matrix kind): who forgets least, who ends best.

    Lower is better for forgetting and for perplexity, higher for accuracy.
    """
    table = summary(groups)
    lines = []
    split = "benchmark" in group_by
    where = list(group_by).index("benchmark") if split else None

    def label(g: Group) -> str:
        return "/".join(v for i, v in enumerate(g.key) if i != where) or "all"

    scopes: dict[tuple[str, str], list[int]] = {}
    for i, g in enumerate(groups):
        scope = g.key[where] if split else ""
        scopes.setdefault((g.matrix, scope), []).append(i)
    for (kind, scope), mine in sorted(scopes.items()):
        if kind not in BARS or kind not in QUALITY:
            continue
        parts = []
        final = QUALITY[kind][0]
        for metric, word, lower in (
            (BARS[kind], "least forgetting", True),
            (final, f"best {final}", kind != names.MATRIX_ACCURACY),
        ):
            scored = [(i, stats(table, i, metric)) for i in mine if stats(table, i, metric)[2] > 0]
            if not scored:
                continue
            best, (mean, std, n) = (min if lower else max)(scored, key=lambda x: x[1][0])
            parts.append(f"{word}: **{label(groups[best])}** ({_fmt(metric, mean, std, n)}, n={n})")
        if parts:
            head = f"{scope} ({kind})" if scope else kind
            lines.append(f"{head}: " + "; ".join(parts))
    return lines


# --- the comparison in a run --------------------------------------------------------------------


def record(
    client: MlflowClient,
    run_id: str,
    groups: Sequence[Group],
    group_by: Sequence[str],
    meta: dict,
    plots: Sequence[Path],
    preface: str = "",
) -> None:
    """Write a comparison into a run: tables (text and ``log_table``), plots, and a description.

    Used by ``--log`` (a run of its own) and by a sweep's parent run (its own runs' comparison).
    The description (``mlflow.note.content``) is what the UI shows on the run's page.
    """
    from mlflow.entities import RunTag

    for fmt in ("md", "csv", "json"):
        client.log_text(run_id, render(groups, group_by, fmt, meta), names.comparison(fmt))
    client.log_table(run_id, table_data(groups, group_by), TABLE_ARTIFACT)
    for path in plots:
        client.log_artifact(run_id, str(path), names.PLOTS)
    lines = [preface] if preface else []
    found = verdict(groups, group_by)
    if found:
        lines += ["**Verdict**", "", *[f"- {line}" for line in found]]
    lines += [
        "",
        f"Mean ± std over seeds (n runs per row), from {meta['n_runs']} runs:",
        "",
        to_markdown(groups, group_by),
        f"Table: `{TABLE_ARTIFACT}`; plots: `plots/` (A_t over experiences, forgetting, "
        "accuracy matrices side by side).",
    ]
    note = "\n".join(lines)
    client.log_batch(run_id, tags=[RunTag(names.TAG_DESCRIPTION, note[:5000])])


def log_comparison(
    client: MlflowClient,
    experiment: str,
    groups: Sequence[Group],
    plots: Sequence[Path],
    meta: dict,
) -> tuple[str, str]:
    """A run of its own (``kind=comparison``) so the table and plots show in the MLflow UI.

    Returns (experiment id, run id). The default filter (``kind=experiment``) keeps such runs
    out of later comparisons.
    """
    from mlflow.entities import Param

    experiment_id = queries.experiment_id(client, experiment)
    store.mark_experiment(client, experiment_id)
    group_by = meta["group_by"]
    tags = {names.TAG_KIND: names.KIND_COMPARISON, names.TAG_GROUP_BY: ",".join(group_by)}
    run = client.create_run(experiment_id, run_name="compare " + ",".join(group_by), tags=tags)
    run_id = run.info.run_id
    params = {
        "experiments": ",".join(meta["experiments"]),
        "filter": meta["filter"][:6000],
        "group_by": ",".join(group_by),
        "n_runs": str(meta["n_runs"]),
    }
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    record(client, run_id, groups, group_by, meta, plots, f"Filter: `{meta['filter']}`")
    client.set_terminated(run_id, "FINISHED")
    return experiment_id, run_id
