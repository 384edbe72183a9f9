"""``lifelong-moe-compare``: the command line over :mod:`lifelong_moe.tracking.comparison`.

Parses the arguments (``--filter`` shorthand included), reads the matching runs, prints the
table and the verdict, writes plots, and records the comparison as a run with ``--log``. The
grouping, the aggregate (pandas) and the tables live in tracking/, where a sweep's parent run
uses them too.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mlflow.tracking import MlflowClient

from lifelong_moe import names
from lifelong_moe.errors import ConfigError
from lifelong_moe.tracking import queries, store
from lifelong_moe.tracking.comparison import (
    TABLE_ARTIFACT,
    Group,
    RunRecord,
    StoreError,
    group_runs,
    log_comparison,
    render,
    search,
    to_markdown,
    verdict,
)
from lifelong_moe.tracking.comparison_plots import plot_matrices, write_plots

# Names a caller of the old all-in-one module imported from here.
__all__ = ["TABLE_ARTIFACT", "Group", "RunRecord", "StoreError", "main", "to_markdown", "verdict"]

_SHORTHAND = re.compile(r"([A-Za-z_][\w.\-/]*)=([^'\"]*)")
_PREFIXES = {"tags": "tags", "tag": "tags", "params": "params", "param": "params"}
_PREFIXES |= {"metrics": "metrics", "metric": "metrics", "attributes": "attributes"}


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def sweep_parent_hint(
    client: MlflowClient, uri: str, experiments: Sequence[str], filters: Sequence[str]
) -> str:
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
