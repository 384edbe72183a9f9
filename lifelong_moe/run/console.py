"""What a run shows (through ``lifelong_moe.log``): one line per experience, the accuracy matrix
and the final metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lifelong_moe import names
from lifelong_moe.log import LOGGER


def experience_line(
    i: int, n: int, method: str, row: Mapping[str, float], train_s: float, eval_s: float
) -> str:
    """``[2/5] LifelongMoE on experience 1: acc ...``: the progress of a run at a glance."""
    language = names.PPL_SEEN in row
    return (
        f"[{i + 1}/{n}] {method} on experience {i}: "
        f"acc {row[names.exp_metric(names.ACC, i)]:.3f}  seen {row[names.ACC_SEEN]:.3f}  "
        f"forgetting {row[names.ACC_FORGETTING]:.3f}  bwt {row[names.ACC_BWT]:+.3f}  "
        + (f"ppl seen {row[names.PPL_SEEN]:.2f}  " if language else "")
        + f"params {int(row[names.COST_PARAMS_TOTAL]):,} "
        f"({int(row[names.COST_PARAMS_ACTIVE]):,} active)  "
        f"train {train_s:.1f}s{_throughput(row)}  eval {eval_s:.2f}s"
    )


def _throughput(row: Mapping[str, float]) -> str:
    """`` (41.2k tok/s)`` for a language-model experience: training throughput at a glance."""
    rate = row.get(names.COST_TOKENS_PER_S)
    return "" if rate is None or names.PPL_SEEN not in row else f" ({rate / 1e3:.1f}k tok/s)"


def print_report(summary: Mapping[str, Any]) -> None:
    """The accuracy matrix and the end-of-stream metrics as a markdown table."""
    R = summary["R"]
    T = len(R)
    lines = ["\nAccuracy matrix R[i][j] (row: after training on i, column: test experience j)"]
    lines.append("      " + "".join(f"  exp{j:<3}" for j in range(T)))
    for i, row in enumerate(R):
        lines.append(f"after {i}" + "".join(f"  {v:6.3f}" for v in row))
    lines.append("b     " + "".join(f"  {v:6.3f}" for v in summary["b"]))
    lines.append("\n| metric | value |\n|---|---|")
    lines += [f"| {key} | {value:.4f} |" for key, value in summary["metrics"].items()]
    LOGGER.info("\n".join(lines))
