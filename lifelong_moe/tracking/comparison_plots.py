"""The plots of a comparison: A_t curves and forgetting bars per group, mean matrices side by side.

Each group's runs are read back from the store (metric histories, matrix artifacts); the
figures are drawn with :mod:`lifelong_moe.evaluation.plots` and matplotlib's ``Figure``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from lifelong_moe import names
from lifelong_moe.evaluation.plots import plot_bars, plot_curves
from lifelong_moe.tracking import queries
from lifelong_moe.tracking.comparison import BARS, CURVE, Group, RunRecord


def write_plots(client: MlflowClient, groups: Sequence[Group], folder: Path) -> list[Path]:
    """Per matrix kind: the seen-so-far curve with a std band, and forgetting bars per group."""
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


def plot_matrices(client: MlflowClient, groups: Sequence[Group], folder: Path) -> list[Path]:
    """Per matrix kind: every group's mean matrix side by side, on one colour scale."""
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
