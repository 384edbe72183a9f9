"""`lifelong-moe-bench hf` on the smallest shape: every implementation timed on every repeat,
the ratio taken against the faster of transformers' two, the table printed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from lifelong_moe import bench  # noqa: E402


def test_bench_hf_tiny(tmp_path, capsys):
    out = tmp_path / "hf.json"
    argv = ["hf", "--layers", "1", "--batch", "1", "--seq", "16", "--vocab", "64",
            "--repeats", "5", "--warmup", "1", "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["ms"]) == {"eager", "grouped_mm", "toolkit MoELayer"}
    assert all(len(v) == 5 for v in report["ms"].values())
    best = report["best_transformers"]
    assert report["median_ms"][best] == min(report["median_ms"][k] for k in ("eager", "grouped_mm"))
    assert report["ratio"] == report["median_ms"]["toolkit MoELayer"] / report["median_ms"][best]
    assert "| toolkit MoELayer |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["hf", "--repeats", "3"])  # fewer than 5 repeats is refused
