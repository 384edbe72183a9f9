"""experiments/gpu_session.sh --dry: the GPU session's every step on CPU, so it does not rot.

Tiny shapes, the fused kernels under the Triton interpreter, every package the GPU machine lacks
and the wheel list does not bring hidden (the import check is the session's last step, its
verdict in steps.jsonl); then the renderer on its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FILES = {
    "session.log",
    "steps.jsonl",
    "preflight.json",
    "cuda_tests.xml",
    "gpu_checks.json",
    "dispatch.jsonl",
    "lm_gpu.jsonl",
    "hf_bench.jsonl",
}


@pytest.mark.slow
def test_dry_session_writes_every_result_and_renders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        ["bash", str(REPO / "experiments" / "gpu_session.sh"), str(out), "--dry"],
        check=True,
        env=env,
        timeout=900,
    )
    # what the device tool brings back: at most 8 plain files, none deeper
    assert {p.name for p in out.iterdir()} == FILES
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    ran = {s["step"]: s for s in steps if "rc" in s}
    assert {"preflight", "cuda-tests", "gpu-checks", "dispatch-e64-eager"} <= set(ran)
    assert {"dispatch-e64-compiled", "lm-grouped-b32", "hf-olmoe", "imports"} <= set(ran)
    assert all(s["rc"] == 0 for s in ran.values()), steps
    assert not any(str(tmp_path) in s.get("command", "") for s in steps)  # no absolute paths
    assert json.loads((out / "preflight.json").read_text())["ok"]
    ET.parse(out / "cuda_tests.xml")
    checks = json.loads((out / "gpu_checks.json").read_text())
    assert all(c.get("ok") is not False for c in checks)
    reports = [json.loads(x) for x in (out / "dispatch.jsonl").read_text().splitlines()]
    assert [r["compile"] for r in reports] == [False, True]
    names = {c["name"] for c in reports[0]["results"][0]["cases"]}
    assert {"dense-active", "moe-grouped", "moe-fused", "fused-step-7/8-frozen"} <= names
    lm = [json.loads(x) for x in (out / "lm_gpu.jsonl").read_text().splitlines()]
    assert [len(row["experiences"]) for row in lm] == [2]
    assert lm[0]["experiences"][0]["cost/tokens_per_s"] > 0
    (hf,) = [json.loads(x) for x in (out / "hf_bench.jsonl").read_text().splitlines()]
    assert hf["step"] == "hf-olmoe" and hf["dtype"] == "bf16" and hf["check"]["ok"]
    assert set(hf["median_ms"]) == {"eager", "grouped_mm", "toolkit MoELayer"}
    assert hf["growth"]["frozen_exact"] and hf["growth"]["masked_ok"]

    results = tmp_path / "results"
    subprocess.run(
        [sys.executable, str(REPO / "experiments" / "gpu_report.py"), str(out),
         "--results", str(results)],
        check=True,
        env=env,
    )  # fmt: skip
    dispatch = (results / "dispatch_h200.md").read_text()
    assert "Dry run on CPU" in dispatch and "| 8 | 64 | 16/32/2 | eager | moe-fused |" in dispatch
    assert "| fused fwd+bwd / dense-active, E=64 T=32768 (eager) | <= 1.15 |" in dispatch
    assert "| grouped | 32 | false | 1 |" in (results / "lm_gpu_h200.md").read_text()
    hf_page = (results / "hf_bench_h200.md").read_text()
    assert "Dry run on CPU" in hf_page and "| toolkit MoELayer |" in hf_page
    assert "| freeze + expand" in hf_page and "Logits check (relative error <= 0.05): ok" in hf_page
