"""`lifelong-moe-bench hf` on the smallest shape: every implementation timed on every repeat,
the ratio taken against the faster of transformers' two, the logits checked against eager's,
the table printed; then the growth step: the masked model is the old one, the frozen banks stay
bit-identical, the new experts train."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from lifelong_moe import bench  # noqa: E402


def test_bench_hf_tiny(tmp_path, capsys):
    out = tmp_path / "hf.json"
    argv = ["hf", "--layers", "1", "--batch", "1", "--seq", "16", "--vocab", "64",
            "--repeats", "5", "--warmup", "1", "--grow", "2", "--grow-steps", "1",
            "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["ms"]) == {"eager", "grouped_mm", "toolkit MoELayer"}
    assert all(len(v) == 5 for v in report["ms"].values())
    best = report["best_transformers"]
    assert report["median_ms"][best] == min(report["median_ms"][k] for k in ("eager", "grouped_mm"))
    assert report["ratio"] == report["median_ms"]["toolkit MoELayer"] / report["median_ms"][best]
    check = report["check"]
    assert check["ok"] and check["relative_error_vs_eager"]["eager"] == 0.0
    assert check["relative_error_vs_eager"]["toolkit MoELayer"] <= 1e-4  # fp32: rounding only
    assert report["dispatch"] == "grouped" and "gated" in report["fused"]
    growth = report["growth"]
    assert (growth["experts_before"], growth["experts_after"]) == (8, 10)
    assert growth["masked_relative_error"] == 0.0  # new experts masked: the pre-growth model
    assert growth["frozen_exact"] and growth["new_experts_trained"]
    assert growth["parameters"]["trainable"] < growth["parameters"]["total"]
    assert len(growth["step_ms"]) == 1
    printed = capsys.readouterr().out
    assert "| toolkit MoELayer |" in printed and "| freeze + expand" in printed
    with pytest.raises(SystemExit):
        bench.main(["hf", "--repeats", "3"])  # fewer than 5 repeats is refused
