"""``lifelong-moe-compare``: aggregate finished runs over seeds into one table per matrix kind.

Reads the layout that :mod:`lifelong_moe.tracking.mlflow_run` writes (one run per method,
benchmark and seed; tags ``kind``, ``matrix``; end-of-stream metrics at the last step), groups
runs by tags or params, and reports mean, std and n per group. Accuracy and perplexity runs never
share a table: their columns mean different things.

Every read goes through :mod:`lifelong_moe.tracking.queries` with a client bound to the given
URI (never the process-wide tracking URI); the rows are few, so plain Python replaces pandas.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from lifelong_moe.errors import ConfigError
from lifelong_moe.evaluation.metrics import mean_std
from lifelong_moe.evaluation.stats import paired_interval
from lifelong_moe.tracking import names, queries, store

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

_SHORTHAND = re.compile(r"([A-Za-z_][\w.\-/]*)=([^'\"]*)")
_PREFIXES = {"tags": "tags", "tag": "tags", "params": "params", "param": "params"}
_PREFIXES |= {"metrics": "metrics", "metric": "metrics", "attributes": "attributes"}


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


@dataclass
class Group:
    matrix: str
    key: tuple[str, ...]
    runs: list[RunRecord] = field(default_factory=list)

    def stats(self, metric: str) -> tuple[float, float, int]:
        return mean_std([r.metrics.get(metric, math.nan) for r in self.runs])


# --- filters ------------------------------------------------------------------------------------


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def filter_clause(text: str) -> str:
    """One ``--filter`` value as an MLflow filter clause.

    ``key=value`` (no spaces around ``=``) is shorthand for a tag; ``params.x=y``,
    ``tags.x=y``, ``metrics.x=0.5`` and ``attributes.x=y`` name the entity. Anything else is
    taken as an MLflow filter string as is (``"metrics.`acc/final` > 0.5"``).
    """
    match = _SHORTHAND.fullmatch(text.strip())
    if not match:
        return text.strip()
    key, value = match.groups()
    prefix, _, rest = key.partition(".")
    if prefix in _PREFIXES and rest:
        entity, key = _PREFIXES[prefix], rest
    else:
        entity = "tags"
    if entity == "metrics":
        try:
            return f"metrics.`{key}` = {float(value)}"
        except ValueError:
            raise ConfigError(f"--filter {text}: a metric filter needs a number") from None
    if entity == "attributes":
        return f"attributes.{key} = {_quote(value)}"
    return f"{entity}.`{key}` = {_quote(value)}"


def build_filter(filters: Sequence[str], include_unfinished: bool) -> str:
    """User clauses AND kind=experiment (unless the user filters on kind) AND status FINISHED."""
    clauses = [filter_clause(f) for f in filters if f.strip()]
    if not any(re.search(rf"tags?\.`?{names.TAG_KIND}\b", c) for c in clauses):
        clauses.append(f"tags.`{names.TAG_KIND}` = '{names.KIND_EXPERIMENT}'")
    if not include_unfinished:
        clauses.append("attributes.status = 'FINISHED'")
    return " AND ".join(clauses)


# --- reading the store --------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def search(client: MlflowClient, experiments: Sequence[str], filter_string: str) -> list[RunRecord]:
    """All runs of the named experiments that match."""
    ids = []
    for name in experiments:
        found = queries.experiment_id(client, name)
        if found is None:
            raise StoreError(f"no experiment named {name!r} in the store")
        ids.append(found)
    # Runs logged before the metric rename (issue 13) read under today's names.
    return [
        RunRecord(
            run.info.run_id, run.data.tags, run.data.params, names.modernize(run.data.metrics)
        )
        for run in queries.search_runs(client, ids, filter_string)
    ]


# --- grouping and tables ------------------------------------------------------------------------


def _lookup(run: RunRecord, key: str) -> str | None:
    prefix, _, rest = key.partition(".")
    if prefix in ("tags", "tag") and rest:
        return run.tags.get(rest)
    if prefix in ("params", "param") and rest:
        return run.params.get(rest)
    return run.tags.get(key, run.params.get(key))


def group_runs(runs: Sequence[RunRecord], group_by: Sequence[str]) -> list[Group]:
    """Groups by (matrix kind, group-by values), sorted; a key no run has is a user mistake."""
    for key in group_by:
        if all(_lookup(r, key) is None for r in runs):
            raise ConfigError(f"--group-by {key}: no matching run has a tag or param of that name")
    groups: dict[tuple[str, tuple[str, ...]], Group] = {}
    for run in runs:
        key = tuple(_lookup(run, k) or "-" for k in group_by)
        groups.setdefault((run.matrix, key), Group(run.matrix, key)).runs.append(run)
    return [groups[k] for k in sorted(groups)]


def columns(matrix: str) -> list[str]:
    return QUALITY.get(matrix, []) + ROUTING + COSTS


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
    kinds = sorted({g.matrix for g in groups})
    parts = []
    for kind in kinds:
        cols = columns(kind)
        header = [*group_by, "n", *cols]
        lines = [
            "| " + " | ".join(header) + " |",
            "|"
            + "|".join("---" if i < len(group_by) else "---:" for i in range(len(header)))
            + "|",
        ]
        for g in (g for g in groups if g.matrix == kind):
            cells = [*g.key, str(len(g.runs))]
            cells += [_fmt(c, *g.stats(c)) for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        title = [f"### {kind}", ""] if len(kinds) > 1 else []
        parts.append("\n".join(title + lines))
    return "\n\n".join(parts) + "\n"


def to_csv(groups: Sequence[Group], group_by: Sequence[str]) -> str:
    """Full precision: ``<metric>_mean`` and ``<metric>_std`` per metric; empty where missing."""
    kinds = sorted({g.matrix for g in groups})
    cols = list(dict.fromkeys(c for k in kinds for c in columns(k)))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["matrix", *group_by, "n", *(f"{c}_{s}" for c in cols for s in ("mean", "std"))]
    )
    for g in groups:
        row = [g.matrix, *g.key, len(g.runs)]
        for c in cols:
            mean, std, n = g.stats(c)
            row += ["", ""] if n == 0 else [repr(round(mean, 10)), repr(round(std, 10))]
        writer.writerow(row)
    return buffer.getvalue()


def to_records(groups: Sequence[Group], group_by: Sequence[str]) -> list[dict]:
    """JSON rows: group values, n, run ids, and per metric mean/std/n (its own n: runs that
    logged it). NaN becomes null."""
    rows = []
    for g in groups:
        metrics = {}
        for c in columns(g.matrix):
            mean, std, n = g.stats(c)
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
        for metric in QUALITY.get(g.matrix, []):
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
        cols = QUALITY.get(kind, [])
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


# --- plots and the comparison run ---------------------------------------------------------------


def write_plots(client, groups: Sequence[Group], folder: Path) -> list[Path]:
    """Per matrix kind: the seen-so-far curve with a std band, and forgetting bars per group."""
    from lifelong_moe.evaluation.plots import plot_bars, plot_curves

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in sorted({g.matrix for g in groups}):
        mine = [g for g in groups if g.matrix == kind]
        curve_key, bar_key = CURVE.get(kind), BARS.get(kind)
        if curve_key is None:
            continue
        curves = {}
        for g in mine:
            seeds = [
                h for r in g.runs if (h := queries.metric_history(client, r.run_id, curve_key))
            ]
            if seeds:
                curves["/".join(g.key)] = seeds
        if curves:
            path = folder / f"{kind}_curves.png"
            ylabel = (
                "A_t (accuracy on seen experiences)" if kind == names.MATRIX_ACCURACY else curve_key
            )
            plot_curves(curves, path, ylabel=ylabel, title=f"{curve_key}: mean ± std over seeds")
            written.append(path)
        bars = {"/".join(g.key): [r.metrics.get(bar_key, math.nan) for r in g.runs] for g in mine}
        path = folder / f"{kind}_forgetting.png"
        plot_bars(bars, path, ylabel=bar_key, title=f"{bar_key} after the last experience")
        written.append(path)
    return written


def _mean_matrix(client: MlflowClient, runs: Sequence[RunRecord], kind: str) -> np.ndarray | None:
    """Mean over a group's runs of their end-of-stream matrix (runs of another shape are left out)."""
    # A run without the artifact (older layout, crashed before the end) is left out too.
    matrices = [
        np.asarray(m, dtype=float) for r in runs if (m := queries.matrix(client, r.run_id, kind))
    ]
    if not matrices:
        return None
    shape = matrices[0].shape
    return np.mean([m for m in matrices if m.shape == shape], axis=0)


def plot_matrices(client, groups: Sequence[Group], folder: Path) -> list[Path]:
    """Per matrix kind: every group's mean matrix side by side, on one colour scale."""
    from matplotlib.figure import Figure

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run
    written = []
    for kind in sorted({g.matrix for g in groups}):
        if kind not in queries.MATRICES:
            continue
        panels = [
            (g, m)
            for g in groups
            if g.matrix == kind and (m := _mean_matrix(client, g.runs, kind)) is not None
        ]
        if not panels:
            continue
        values = np.concatenate([m.ravel() for _, m in panels])
        values = values[np.isfinite(values)]
        if kind == names.MATRIX_ACCURACY:
            vmin, vmax = 0.0, 1.0
        else:
            vmin, vmax = float(values.min()), float(values.max())
        size = max(m.shape[0] for _, m in panels)
        fig = Figure(figsize=(1.0 + max(2.4, 0.55 * size + 0.8) * len(panels), 1.2 + 0.5 * size))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (g, m) in zip(axes, panels, strict=True):
            image = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax)
            if m.size <= 144:
                for (i, j), v in np.ndenumerate(m):
                    shade = (v - vmin) / (vmax - vmin or 1.0)
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if shade > 0.6 else "white",
                    )
            ax.set_title("\n".join(g.key) + f" (n={len(g.runs)})", fontsize=9)
            ax.set_xlabel("test experience j")
            ax.set_xticks(range(m.shape[1]))
            ax.set_yticks(range(m.shape[0]))
        axes[0].set_ylabel("after training on i")
        label = (
            "accuracy R[i][j], mean over seeds"
            if kind == names.MATRIX_ACCURACY
            else f"{kind}, mean"
        )
        fig.colorbar(image, ax=list(axes), label=label, shrink=0.9)
        path = folder / f"{kind}_matrices.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        written.append(path)
    return written


def verdict(groups: Sequence[Group], group_by: Sequence[str]) -> list[str]:
    """One line per benchmark (or per matrix kind): who forgets least, who ends best.

    Lower is better for forgetting and for perplexity, higher for accuracy.
    """
    lines = []
    split = "benchmark" in group_by
    where = list(group_by).index("benchmark") if split else None

    def label(g: Group) -> str:
        return "/".join(v for i, v in enumerate(g.key) if i != where) or "all"

    scopes: dict[tuple[str, str], list[Group]] = {}
    for g in groups:
        scope = g.key[where] if split else ""
        scopes.setdefault((g.matrix, scope), []).append(g)
    for (kind, scope), mine in sorted(scopes.items()):
        if kind not in BARS or kind not in QUALITY:
            continue
        parts = []
        final = QUALITY[kind][0]
        for metric, word, lower in (
            (BARS[kind], "least forgetting", True),
            (final, f"best {final}", kind != names.MATRIX_ACCURACY),
        ):
            scored = [(g, g.stats(metric)) for g in mine if g.stats(metric)[2] > 0]
            if not scored:
                continue
            best, (mean, std, n) = (min if lower else max)(scored, key=lambda x: x[1][0])
            parts.append(f"{word}: **{label(best)}** ({_fmt(metric, mean, std, n)}, n={n})")
        if parts:
            head = f"{scope} ({kind})" if scope else kind
            lines.append(f"{head}: " + "; ".join(parts))
    return lines


def table_data(groups: Sequence[Group], group_by: Sequence[str]) -> dict[str, list]:
    """The aggregate as columns for ``MlflowClient.log_table``: one row per group, mean/std/n."""
    kinds = sorted({g.matrix for g in groups})
    cols = list(dict.fromkeys(c for k in kinds for c in columns(k)))
    data: dict[str, list] = {k: [] for k in [*group_by, "matrix", "n"]}
    for c in cols:
        data[f"{c} mean"], data[f"{c} std"] = [], []
    for g in groups:
        for key, value in zip(group_by, g.key, strict=True):
            data[key].append(value)
        data["matrix"].append(g.matrix)
        data["n"].append(len(g.runs))
        for c in cols:
            mean, std, n = g.stats(c)
            data[f"{c} mean"].append(None if n == 0 else round(mean, 6))
            data[f"{c} std"].append(None if n == 0 else round(std, 6))
    return data


def record(
    client,
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
    client, experiment: str, groups: Sequence[Group], plots: Sequence[Path], meta: dict
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


def sweep_parent_hint(client, uri: str, experiments: Sequence[str], filters: Sequence[str]) -> str:
    """With ``--filter sweep_id=X``: the line that opens that sweep's parent run, else ''."""
    pattern = rf"(tags?\.)?{names.TAG_SWEEP_ID}=(\S+)"
    ids = [m.group(2) for f in filters if (m := re.fullmatch(pattern, f))]
    for sweep in ids:
        for name in experiments:
            experiment_id = queries.experiment_id(client, name)
            parent = experiment_id and queries.sweep_parent(client, experiment_id, sweep)
            if parent:
                hint = store.ui_hint(uri, experiment_id, parent)
                return f"The sweep's parent run holds this comparison: {hint}"
    return ""


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lifelong-moe-compare",
        description="Aggregate lifelong-moe runs over seeds: mean ± std and n per group.",
    )
    parser.add_argument(
        "--tracking-uri", default="sqlite:///mlflow.db", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--experiment",
        action="extend",
        nargs="+",
        help="MLflow experiment name(s) (default: lifelong-moe); repeatable",
    )
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        help="key=value on a tag, params.x=y, tags.x=y, or an MLflow filter string; repeatable",
    )
    parser.add_argument(
        "--group-by",
        default="method,benchmark",
        help="comma-separated tags or params (default: %(default)s)",
    )
    parser.add_argument(
        "--format", choices=["md", "csv", "json"], default="md", help="(default: %(default)s)"
    )
    parser.add_argument("--output", type=Path, help="write the table here instead of stdout")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write curves and bar charts here")
    parser.add_argument("--log", action="store_true", help="record the comparison as an MLflow run")
    parser.add_argument(
        "--reference",
        metavar="METHOD",
        help="also show each method's paired difference from METHOD over seeds (95 %% t CI)",
    )
    parser.add_argument(
        "--include-unfinished", action="store_true", help="also RUNNING/FAILED runs"
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    experiments = args.experiment or ["lifelong-moe"]
    group_by = [k.strip() for k in args.group_by.split(",") if k.strip()]
    if not group_by:
        raise ConfigError(
            f"--group-by {args.group_by!r}: expected comma-separated tag or param names"
        )
    filter_string = build_filter(args.filter, args.include_unfinished)

    store.check_store(args.tracking_uri, must_exist=True)
    client = store.client(args.tracking_uri)
    try:
        runs = search(client, experiments, filter_string)
    except StoreError:
        raise
    except Exception as error:  # transport, SQL or filter-syntax errors: say which store, once
        raise StoreError(
            f"cannot read runs from {store.redact(args.tracking_uri)}: {_first_line(error)}"
        ) from None
    if not runs:
        raise StoreError(
            f"no runs match in experiment(s) {', '.join(experiments)} with filter: {filter_string}"
        )
    groups = group_runs(runs, group_by)
    meta = {
        "experiments": experiments,
        "filter": filter_string,
        "group_by": group_by,
        "n_runs": len(runs),
    }
    text = render(groups, group_by, args.format, meta, args.reference)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)

    lines = verdict(groups, group_by)
    if lines and args.format == "md":
        print("\n".join(lines).replace("**", ""), file=sys.stderr)
    plots: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.plot or args.log:
            folder = args.plot or Path(tmp)
            plots = write_plots(client, groups, folder) + plot_matrices(client, groups, folder)
            if args.plot:
                print(f"wrote {len(plots)} plots to {args.plot}", file=sys.stderr)
        if args.log:
            experiment_id, run_id = log_comparison(client, experiments[0], groups, plots, meta)
            print(f"logged comparison run {run_id} in experiment {experiments[0]}", file=sys.stderr)
            hint = store.ui_hint(args.tracking_uri, experiment_id, run_id)
            print(f"See the comparison: {hint}", file=sys.stderr)
    hint = sweep_parent_hint(client, args.tracking_uri, experiments, args.filter)
    if hint:
        print(hint, file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lifelong-moe-compare``; returns the exit status (2 on user errors)."""
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
