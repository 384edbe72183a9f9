"""Plots write non-empty PNGs and survive edge cases (one experience, one seed, many experts)."""

import numpy as np
import pytest
from matplotlib.figure import Figure

from lifelong_moe.evaluation.plots import plot_bars, plot_curves, plot_matrix, plot_routing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_matrix_accuracy_and_perplexity(tmp_path):
    R = np.array([[0.9, 0.1, 0.12], [0.5, 0.88, 0.2], [0.4, 0.6, 0.91]])
    fig = plot_matrix(R, tmp_path / "acc.png", title="acc", col_labels=["a", "b", "c"])
    assert isinstance(fig, Figure)
    assert_png(tmp_path / "acc.png")
    # Values are written into the cells with two decimals.
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"0.90", "0.88", "0.91"} <= texts
    plot_matrix(np.exp(R * 5), tmp_path / "sub" / "ppl.png", colorbar_label="perplexity")
    assert_png(tmp_path / "sub" / "ppl.png")


def test_plot_matrix_single_experience(tmp_path):
    plot_matrix([[0.7]], tmp_path / "one.png")
    assert_png(tmp_path / "one.png")


def test_plot_matrix_without_path_returns_figure():
    assert isinstance(plot_matrix([[0.5, 0.1], [0.4, 0.6]]), Figure)


def test_plot_routing_groups_experts_by_origin(tmp_path):
    rng = np.random.default_rng(0)
    shares = rng.dirichlet(np.ones(6), size=3)
    routing = {
        "layers": {"blocks.1.moe": shares.tolist(), "blocks.3.moe": shares[::-1].tolist()},
        "expert_origin": [0, 0, 1, 1, 2, 2],
    }
    fig = plot_routing(routing, tmp_path / "routing.png")
    assert_png(tmp_path / "routing.png")
    top = fig.axes[0].child_axes[0]  # the "created by" axis above the first panel
    assert [t.get_text() for t in top.get_xticklabels()] == ["exp 0", "exp 1", "exp 2"]


@pytest.mark.parametrize("n_layers,n_experts,n_exp", [(1, 1, 1), (5, 40, 8)])
def test_plot_routing_any_shape(tmp_path, n_layers, n_experts, n_exp):
    layers = {f"l{k}": np.full((n_exp, n_experts), 1.0 / n_experts) for k in range(n_layers)}
    origin = sorted(i % n_exp for i in range(n_experts))
    plot_routing({"layers": layers, "expert_origin": origin}, tmp_path / "r.png")
    assert_png(tmp_path / "r.png")


def test_plot_routing_list_layers_and_unsorted_or_missing_origin(tmp_path):
    shares = [[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]
    fig = plot_routing({"layers": [shares], "expert_origin": [1, 0, 1]}, tmp_path / "a.png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "0", "2"]
    plot_routing({"layers": {"x": shares}}, tmp_path / "b.png")
    assert_png(tmp_path / "b.png")
    with pytest.raises(ValueError, match="no layers"):
        plot_routing({"layers": {}})


def test_plot_curves_and_bars(tmp_path):
    curves = {
        "naive": np.array([[0.9, 0.5, 0.3], [0.92, 0.55, 0.35]]),
        "lifelong_moe": [[0.9, 0.8, 0.7]],  # one seed: no band, still a line
        "ragged": [[0.9, 0.6], [0.8, 0.7, 0.6]],  # an unfinished seed
    }
    plot_curves(curves, tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")
    plot_bars({"naive": [0.6, 0.62], "lifelong_moe": [0.2], "ewc": 0.4}, tmp_path / "bars.png")
    assert_png(tmp_path / "bars.png")


def test_plot_curves_one_experience_one_seed(tmp_path):
    plot_curves({"naive": [[0.8]]}, tmp_path / "c.png")
    assert_png(tmp_path / "c.png")
    plot_curves({"flat": [0.8, 0.7]}, tmp_path / "flat.png")  # a flat list is one seed
    assert_png(tmp_path / "flat.png")
    plot_bars({"naive": [0.1]}, tmp_path / "b.png")
    assert_png(tmp_path / "b.png")
