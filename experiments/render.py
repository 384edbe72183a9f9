"""Render every number in the committed text from the committed artifacts beside it.

    .venv/bin/python experiments/render.py            # rewrite every rendered block in place
    .venv/bin/python experiments/render.py --check    # exit 1 naming each file that differs
    .venv/bin/python experiments/render.py extract STUDY   # see below

A rendered block is ``<!-- render:KIND ARGS -->text<!-- /render -->`` in README.md or any
results/**/*.md; ``text`` is replaced by what KIND renders from results/STUDY/comparison.json
(tests/test_render.py checks that the committed text equals the render):

- ``results STUDY``: the study's comparison table (its own columns, as lifelong-moe-compare wrote)
- ``per_experience STUDY``: final accuracy (perplexity) on each experience
- ``table STUDY METRIC,METRIC [method=a,b] [benchmark=x]``: an excerpt of the comparison
- ``value STUDY METHOD BENCHMARK METRIC``: one cell, ``mean ± std`` (the mean alone for n = 1);
  a per-experience METRIC (``ppl/exp_3``) is read from the per-experience table
- ``mean STUDY METHOD BENCHMARK METRIC``: the mean alone
- ``ratio STUDY METHOD OTHER BENCHMARK METRIC``: mean(METHOD) / mean(OTHER), ``1.7x`` (per-experience
  metrics too)
- ``paired STUDY``: each method's paired difference from the study's reference method over seeds
  (95 % paired t intervals, ``lifelong-moe-compare --reference``)
- ``wall STUDY``: the study's total wall time in seconds
- ``seeds STUDY``: the number of seeds (runs per group; one number, or ``min-max``)

comparison.json holds ``rows`` (lifelong-moe-compare's JSON rows), ``columns`` (the table's
columns), ``per_experience`` (rows of the same shape) and ``wall_s``. experiments/study.py
writes it; ``extract`` builds it once from a README.md table written before it existed (the
same numbers at the table's precision; ``source`` says so), modernising metric names.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from lifelong_moe import names
from lifelong_moe.tracking.comparison import _fmt, paired_markdown

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"  # where results/STUDY/comparison.json are read (a smoke run: elsewhere)
COMPARISON = "comparison.json"
GROUP_BY = ["method", "benchmark"]
BLOCK = re.compile(r"<!-- render:(?P<spec>[^>]*?) -->(?P<body>.*?)<!-- /render -->", re.S)


class RenderError(ValueError):
    """A block names a study, row or metric the artifacts do not have."""


# --- the artifacts ------------------------------------------------------------------------------


def load(study: str) -> dict:
    path = RESULTS / study / COMPARISON
    if not path.exists():
        raise RenderError(f"{path} does not exist")
    return json.loads(path.read_text())


def find(rows: list[dict], method: str, benchmark: str, study: str) -> dict:
    for row in rows:
        if row["method"] == method and row["benchmark"] == benchmark:
            return row
    raise RenderError(f"{study}: no row for method={method} benchmark={benchmark}")


def cell(row: dict, metric: str) -> str:
    m = row["metrics"].get(metric)
    if m is None or m["mean"] is None:
        return "-"
    return _fmt(metric, m["mean"], m["std"], m["n"])


def markdown(rows: list[dict], columns: list[str]) -> str:
    """lifelong-moe-compare's markdown table (method, benchmark, n, columns)."""
    header = [*GROUP_BY, "n", *columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
    ]
    for row in rows:
        cells = [row["method"], row["benchmark"], str(row["n"])]
        lines.append("| " + " | ".join(cells + [cell(row, c) for c in columns]) + " |")
    return "\n".join(lines)


# --- block kinds --------------------------------------------------------------------------------


def _results(study: str) -> str:
    data = load(study)
    return "\n" + markdown(data["rows"], data["columns"]) + "\n"


def _per_experience(study: str) -> str:
    data = load(study)
    rows = data["per_experience"]
    columns = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    return "\n" + markdown(rows, columns) + "\n"


def _table(study: str, metrics: str, *filters: str) -> str:
    rows = load(study)["rows"]
    for f in filters:
        key, _, values = f.partition("=")
        rows = [r for r in rows if r.get(key) in values.split(",")]
    if not rows:
        raise RenderError(f"{study}: no rows match {' '.join(filters)}")
    return "\n" + markdown(rows, metrics.split(",")) + "\n"


def rows_for(study: str, metric: str) -> list[dict]:
    """The rows that hold ``metric``: per-experience ones (``ppl/exp_0``) or the summary rows."""
    data = load(study)
    return data["per_experience"] if "/exp_" in metric else data["rows"]


def _value(study: str, method: str, benchmark: str, metric: str) -> str:
    value = cell(find(rows_for(study, metric), method, benchmark, study), metric)
    if value == "-":
        raise RenderError(f"{study}: {method} on {benchmark} has no {metric}")
    return value


def _mean(study: str, method: str, benchmark: str, metric: str) -> str:
    return _value(study, method, benchmark, metric).split(" ± ")[0]


def _ratio(study: str, method: str, other: str, benchmark: str, metric: str) -> str:
    rows = rows_for(study, metric)
    a = find(rows, method, benchmark, study)["metrics"][metric]["mean"]
    b = find(rows, other, benchmark, study)["metrics"][metric]["mean"]
    return f"{a / b:.1f}x"


def _paired(study: str) -> str:
    data = load(study)
    return "\n" + paired_markdown(data["paired"], GROUP_BY, data["reference"])


def _difference(study: str, method: str, benchmark: str, metric: str) -> str:
    """One paired difference ``method - reference`` with its 95 % interval, for prose."""
    data = load(study)
    found = [
        p for p in data.get("paired", []) if (p["method"], p["benchmark"]) == (method, benchmark)
    ]
    value = found[0]["metrics"].get(metric) if found else None
    if value is None or value.get("mean") is None:
        raise RenderError(f"{study}: no paired {metric} for {method} on {benchmark}")
    return f"{value['mean']:+.3f} [{value['low']:+.3f}, {value['high']:+.3f}]"


def _wall(study: str) -> str:
    return f"{load(study)['wall_s']:.0f} s"


def _seeds(study: str) -> str:
    counts = sorted({r["n"] for r in load(study)["rows"]})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


KINDS: dict[str, Callable[..., str]] = {
    "results": _results,
    "per_experience": _per_experience,
    "table": _table,
    "value": _value,
    "mean": _mean,
    "ratio": _ratio,
    "paired": _paired,
    "difference": _difference,
    "wall": _wall,
    "seeds": _seeds,
}


def render_text(text: str) -> str:
    """``text`` with every block's body replaced by its render."""

    def one(match: re.Match) -> str:
        kind, *args = match["spec"].split()
        if kind not in KINDS:
            raise RenderError(f"render:{kind}: expected one of {sorted(KINDS)}")
        return f"<!-- render:{match['spec']} -->{KINDS[kind](*args)}<!-- /render -->"

    return BLOCK.sub(one, text)


def files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "results").rglob("*.md"))]


# --- extract: comparison.json from a README table written before it existed ----------------------


def _parse_cell(text: str) -> dict:
    text = text.strip()
    if text == "-":
        return {"mean": None, "std": None, "n": 0}
    mean, _, std = text.partition(" ± ")
    return {"mean": float(mean.replace(",", "")), "std": float(std.replace(",", "") or 0)}


def _parse_table(lines: list[str]) -> tuple[list[str], list[dict]]:
    header = [c.strip() for c in lines[0].strip("| \n").split("|")]
    columns = [names.LEGACY.get(c, c) for c in header[3:]]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("| \n").split("|")]
        n = int(cells[2])
        metrics = {}
        for column, text in zip(columns, cells[3:], strict=True):
            value = _parse_cell(text)
            metrics[column] = {**value, "n": value.get("n", n)}
        rows.append({"method": cells[0], "benchmark": cells[1], "n": n, "metrics": metrics})
    return columns, rows


def _table_after(lines: list[str], heading: str) -> tuple[int, int]:
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("| method"))
    last = first
    while last < len(lines) and lines[last].startswith("|"):
        last += 1
    return first, last


def extract(study: str) -> None:
    """Write results/STUDY/comparison.json from its README.md and put the README's two tables
    in rendered blocks."""
    path = REPO / "results" / study / "README.md"
    lines = path.read_text().splitlines()
    first, last = _table_after(lines, "## Results")
    columns, rows = _parse_table(lines[first:last])
    data: dict = {
        "source": "parsed from README.md (lifelong-moe-compare's table at 3 decimals) by "
        "experiments/render.py extract; later studies write it from the store",
        "columns": columns,
        "rows": rows,
    }
    wall = [line for line in lines if line.startswith("Total wall time")]
    if wall:
        data["wall_s"] = float(re.search(r"([\d.]+) s\.", wall[0]).group(1))
    blocks = [(first, last, f"results {study}")]
    if any(line.startswith("## Final") for line in lines):
        pfirst, plast = _table_after(lines, "## Final")
        data["per_experience"] = _parse_table(lines[pfirst:plast])[1]
        blocks.append((pfirst, plast, f"per_experience {study}"))
    (path.parent / COMPARISON).write_text(json.dumps(data, indent=1) + "\n")
    for first, last, spec in reversed(blocks):
        lines[first:last] = [f"<!-- render:{spec} -->", *lines[first:last], "<!-- /render -->"]
    path.write_text(render_text("\n".join(lines) + "\n"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=["extract"])
    parser.add_argument("study", nargs="?")
    parser.add_argument("--check", action="store_true", help="only say which files differ")
    options = parser.parse_args(argv)
    if options.command == "extract":
        extract(options.study)
        return 0
    stale = []
    for path in files():
        text = path.read_text()
        rendered = render_text(text)
        if rendered != text:
            stale.append(path.relative_to(REPO))
            if not options.check:
                path.write_text(rendered)
    verb = "differ from their render" if options.check else "rendered"
    for path in stale:
        print(f"{path}: {verb}", file=sys.stderr)
    return 1 if stale and options.check else 0


if __name__ == "__main__":
    sys.exit(main())
