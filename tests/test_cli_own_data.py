"""Your own data end to end: an npz the test writes, lifelong_moe vs naive through the real CLI."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.conftest import FAST, artifact_json, run_cli, runs, store_uri

pytestmark = pytest.mark.slow


def test_npz_stream_lifelong_moe_vs_naive(workdir):
    digits = load_digits()
    x = (digits.images * 15).astype(np.uint8)  # (N, 8, 8) uint8 like a user's image array
    y = digits.target.astype(np.int64) + 100  # arbitrary label values are renumbered
    path = workdir / "mine.npz"
    np.savez(path, x=x, y=y)
    uri = store_uri(workdir)
    run_cli(
        workdir,
        "-m",
        "method=naive,lifelong_moe",
        "benchmark=npz",
        f"benchmark.path={path}",
        "benchmark.n_experiences=5",
        f"tracking.uri={uri}",
        *FAST,
    )
    found = {r.data.tags["method"]: r for r in runs(uri)}
    assert set(found) == {"naive", "lifelong_moe"}
    for run in found.values():
        assert run.info.status == "FINISHED" and run.data.tags["benchmark"] == "npz"
        matrix = artifact_json(uri, run.info.run_id, "accuracy_matrix.json")
        assert np.array(matrix["R"]).shape == (5, 5)
        assert sorted(c for e in matrix["experiences"] for c in e["classes"]) == list(range(10))
        assert np.diag(matrix["R"]).min() > 0.6  # every experience is learned (2 epochs)
