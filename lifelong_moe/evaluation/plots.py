"""Figures for runs and comparisons: accuracy matrix, routing, A_t curves, bar charts.

Figures are built on ``matplotlib.figure.Figure`` directly, never through pyplot: no global
figure registry to leak from long sweeps, and no GUI backend is touched (PNG goes through Agg).
Every function returns the Figure and, given a path, also writes it there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lifelong_moe.evaluation.metrics import mean_std

PathLike = str | Path


def _save(fig: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def _annotate(ax, values: np.ndarray, image, fmt: str, max_cells: int = 400) -> None:
    """Write each cell's value in a colour that stays readable on the cell's colour.

    Above ``max_cells`` the numbers become unreadable and are left out.
    """
    n_rows, n_cols = values.shape
    if n_rows * n_cols > max_cells:
        return
    size = max(5, min(10, 120 // max(n_rows, n_cols)))
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            if np.isnan(v):
                continue
            r, g, b, _ = image.cmap(image.norm(v))
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, fmt.format(v), ha="center", va="center", color=color, fontsize=size)


def plot_matrix(
    R: Sequence[Sequence[float]] | np.ndarray,
    path: PathLike | None = None,
    title: str = "accuracy matrix",
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    fmt: str = "{:.2f}",
    colorbar_label: str = "accuracy",
) -> Figure:
    """Annotated heatmap of R (rows: after training on i, columns: test experience j).

    The colour scale is fixed to [0, 1] when all values lie there, so accuracy matrices of
    different runs look comparable side by side; otherwise (perplexity, loss) it follows the data.
    """
    R = np.atleast_2d(np.asarray(R, dtype=float))
    n_rows, n_cols = R.shape
    finite = R[np.isfinite(R)]
    in_unit = finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)
    vmin, vmax = (0.0, 1.0) if in_unit else (float(finite.min()), float(finite.max()))

    fig = Figure(figsize=(1.5 + 0.6 * max(n_cols, 3), 1.2 + 0.5 * max(n_rows, 3)))
    ax = fig.add_subplot()
    image = ax.imshow(R, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    _annotate(ax, R, image, fmt)
    ax.set_xticks(range(n_cols), labels=list(col_labels) if col_labels else range(n_cols))
    ax.set_yticks(range(n_rows), labels=list(row_labels) if row_labels else range(n_rows))
    ax.set_xlabel("test experience j")
    ax.set_ylabel("after training on experience i")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    return _save(fig, path)


def _expert_groups(origin: Sequence[int], n_experts: int) -> tuple[np.ndarray, list[int]]:
    """Column order that puts experts of the same creating experience together, and the origins.

    Experts are normally created in order (frozen ones take the lowest ids), so the order is
    usually the identity; a stable sort keeps ids increasing within a group either way. Without
    a usable origin list every expert counts as one group.
    """
    if len(origin) != n_experts:
        return np.arange(n_experts), [0] * n_experts
    order = np.argsort(np.asarray(origin), kind="stable")
    return order, [int(origin[k]) for k in order]


def plot_routing(
    routing: Mapping,
    path: PathLike | None = None,
    title: str = "routing: share of each test experience's tokens per expert",
) -> Figure:
    """One panel per MoE layer: test experience x expert heatmap of routing shares.

    ``routing = {"layers": {name: [[share per expert] per test experience]},
    "expert_origin": [experience that created each expert]}``; ``layers`` may also be a list,
    ``expert_origin`` a dict ``{name: [...]}`` when layers grew differently. Experts are grouped
    by the experience that created them (white separator lines, group labels on top), which is
    what shows whether new experts specialize on the data they were created for.
    """
    layers = routing.get("layers", {})
    if not isinstance(layers, Mapping):  # a plain list of layers: name them by position
        layers = {f"layer {k}": v for k, v in enumerate(layers)}
    if not layers:
        raise ValueError("routing statistics have no layers to plot")
    origins = routing.get("expert_origin", [])

    shapes = [np.atleast_2d(np.asarray(v, dtype=float)).shape for v in layers.values()]
    max_experts = max(s[1] for s in shapes)
    max_exps = max(s[0] for s in shapes)
    # One colour scale for all panels, up to the largest share: with many experts every share is
    # small, and a fixed [0, 1] scale would paint the whole figure black.
    top_share = max(
        float(np.nanmax(np.asarray(v, dtype=float), initial=0.0)) for v in layers.values()
    )
    vmax = top_share if top_share > 0 else 1.0
    n = len(layers)
    # Wide panels (many experts) stack in one column; small ones tile in a square-ish grid.
    n_cols = 1 if max_experts > 12 else math.ceil(math.sqrt(n))
    n_rows = math.ceil(n / n_cols)
    panel_w = 1.5 + 0.35 * min(max(max_experts, 4), 48)
    panel_h = 1.3 + 0.35 * max(max_exps, 3)
    fig = Figure(figsize=(panel_w * n_cols + 1.0, panel_h * n_rows + 0.8), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)

    image = None
    for k, (name, shares) in enumerate(layers.items()):
        ax = axes[k // n_cols][k % n_cols]
        S = np.atleast_2d(np.asarray(shares, dtype=float))
        origin = origins.get(name, []) if isinstance(origins, Mapping) else origins
        order, grouped = _expert_groups(list(origin), S.shape[1])
        S = S[:, order]
        image = ax.imshow(S, cmap="magma", vmin=0.0, vmax=vmax, aspect="auto")
        _annotate(ax, S, image, "{:.2f}", max_cells=160)
        ax.set_title(str(name), fontsize=10)
        ax.set_ylabel("test experience")
        ax.set_yticks(range(S.shape[0]))
        if S.shape[1] <= 32:
            ax.set_xticks(range(S.shape[1]), labels=[str(e) for e in order], fontsize=7)
        ax.set_xlabel("expert")
        # Separators and group labels (on a top axis) where the creating experience changes.
        starts = [0] + [c for c in range(1, len(grouped)) if grouped[c] != grouped[c - 1]]
        ends = starts[1:] + [len(grouped)]
        for c in starts[1:]:
            ax.axvline(c - 0.5, color="white", linewidth=2)
        if len(origin) == S.shape[1]:
            top = ax.secondary_xaxis("top")
            top.set_xticks(
                [(lo + hi - 1) / 2 for lo, hi in zip(starts, ends, strict=True)],
                labels=[f"exp {grouped[lo]}" for lo in starts],
                fontsize=7,
            )
            top.set_xlabel("created by", fontsize=7)
    for k in range(n, n_rows * n_cols):
        axes[k // n_cols][k % n_cols].set_visible(False)
    fig.suptitle(title)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="share of tokens")
    return _save(fig, path)


def _as_runs(values) -> np.ndarray:
    """[n_seeds, T] float array; a flat list is one seed, ragged seeds are padded with NaN."""
    if isinstance(values, np.ndarray):
        return np.atleast_2d(values.astype(float))
    if all(np.ndim(v) == 0 for v in values):
        return np.atleast_2d(np.asarray(values, dtype=float))
    rows = [np.asarray(v, dtype=float).ravel() for v in values]
    out = np.full((len(rows), max(r.size for r in rows)), np.nan)
    for i, r in enumerate(rows):
        out[i, : r.size] = r
    return out


def plot_curves(
    curves: Mapping[str, Sequence[Sequence[float]] | np.ndarray],
    path: PathLike | None = None,
    ylabel: str = "average accuracy on seen experiences (A_t)",
    title: str = "",
) -> Figure:
    """Mean curve over seeds per method with a +-1 std band; ``curves = {method: [n_seeds, T]}``.

    Seeds with shorter curves (an unfinished run) are padded with NaN and ignored where missing.
    """
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    for method, values in curves.items():
        runs = _as_runs(values)
        stats = [mean_std(runs[:, t]) for t in range(runs.shape[1])]
        mean = np.array([s[0] for s in stats])
        std = np.array([s[1] for s in stats])
        n = max((s[2] for s in stats), default=0)
        x = np.arange(runs.shape[1])
        (line,) = ax.plot(x, mean, marker="o", label=f"{method} (n={n})")
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("after training on experience")
    ax.set_ylabel(ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(
    values: Mapping[str, Sequence[float] | float],
    path: PathLike | None = None,
    ylabel: str = "forgetting",
    title: str = "",
) -> Figure:
    """Bar per method at the mean over seeds, with a std error bar and each seed as a dot."""
    names = [str(n) for n in values]
    values = dict(zip(names, values.values(), strict=True))
    # Long or many labels (group keys like "method/benchmark") are slanted so they never overlap.
    slant = len(names) > 3 or max((len(n) for n in names), default=0) > 10
    fig = Figure(figsize=(1.5 + 0.9 * max(len(names), 2), 4.0))
    ax = fig.add_subplot()
    for k, name in enumerate(names):
        seeds = np.atleast_1d(np.asarray(values[name], dtype=float))
        mean, std, _ = mean_std(seeds)
        ax.bar(k, mean, yerr=std, capsize=4, color=f"C{k % 10}", alpha=0.8)
        ax.scatter(np.full(seeds.size, k), seeds, color="black", s=10, zorder=3)
    ax.set_xticks(
        range(len(names)),
        labels=names,
        rotation=30 if slant else 0,
        ha="right" if slant else "center",
    )
    ax.set_ylabel(ylabel)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.grid(True, axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(fig, path)
