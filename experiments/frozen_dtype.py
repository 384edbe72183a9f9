"""Issue 25 item 4: frozen expert banks stored in bf16 / int8 / fp8 against fp32.

    .venv/bin/python experiments/frozen_dtype.py            # runs + dispatch memory + tables
    .venv/bin/python experiments/frozen_dtype.py --render   # tables again from results.json

Two parts, written to results/frozen_dtype/:

1. Runs: method=lifelong_moe with method.frozen_dtype in {fp32, bf16, int8, fp8}, 5 seeds each,
   on permuted digits (experiment=demo: 5 experiences, 3 epochs) and on the text domains
   (experiment=lm_cpu). Each run is its own process, one thread, one after the other. The table
   gives the stored bytes of the frozen banks after the last experience (cost/frozen_bytes), the
   paired change against fp32 (same seed) of acc/final, acc/forgetting, ppl/final (relative, %)
   and ppl/forgetting, each as mean and paired 95 % t-interval over the seeds.
2. Dispatch memory: these tiny models' frozen banks are a few MB, far below the noise of a
   process's resident memory, so the peak is measured where the bank dominates: one MoE layer
   (d 512, h 1024, 48 frozen + 2 trainable experts, 1024 tokens, top-2), one forward + backward
   in a fresh process per format, peak resident memory above the resident memory before the step
   (the high-water mark is reset with /proc/self/clear_refs), and the wall time of a step relative
   to fp32's (median of 7 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results" / "frozen_dtype"
STORE = REPO / "outputs" / "frozen_dtype"
BIN = Path(sys.executable).parent
FORMATS = ("fp32", "bf16", "int8", "fp8")
SEEDS = (0, 1, 2, 3, 4)
BENCHMARKS = {
    "permuted_digits": ["experiment=demo"],
    # a quarter of lm_cpu's text (64 KiB per domain): 20 runs must fit beside 5 other engineers
    "text_domains": ["experiment=lm_cpu", "benchmark.max_bytes_per_domain=65536"],
}
METRICS = {  # name -> how the change against fp32 is reported
    "acc/final": "diff",
    "acc/forgetting": "diff",
    "ppl/final": "percent",
    "ppl/forgetting": "diff",
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


# -- part 1: whole runs -------------------------------------------------------------------------
def run_all(data: dict, save, benchmarks: tuple[str, ...] = tuple(BENCHMARKS)) -> None:
    """Appends one row per run to data["runs"] and saves after each; done runs are skipped."""
    from lifelong_moe.tracking import store as tracking_store

    STORE.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{STORE / 'mlflow.db'}"
    done = {(r["benchmark"], r["format"], r["seed"]) for r in data["runs"]}
    # fp32 and int8 (the target) first on both benchmarks, then bf16 and fp8: a run that is
    # stopped early has the pairs that matter most; started again, it skips what is done.
    order = [
        (b, f) for pair in (("fp32", "int8"), ("bf16", "fp8")) for b in benchmarks for f in pair
    ]
    for benchmark, fmt in order:
        preset = BENCHMARKS[benchmark]
        for seed in SEEDS:
            if (benchmark, fmt, seed) in done:
                continue
            experiment = f"frozen_dtype_{benchmark}"
            args = [
                *preset,
                "method=lifelong_moe",
                f"method.frozen_dtype={fmt}",
                f"method.name=lifelong_moe_{fmt}",
                f"seed={seed}",
                "trainer.progress_bar=false",
                "tracking.log_checkpoints=false",
                f"tracking.uri={uri}",
                f"tracking.experiment={experiment}",
            ]
            start = time.perf_counter()
            subprocess.run(
                [str(BIN / "lifelong-moe"), *args],
                cwd=STORE,
                env=ENV,
                check=True,
                capture_output=True,
            )
            took = time.perf_counter() - start
            client = tracking_store.client(uri)
            exp = client.get_experiment_by_name(experiment)
            run = client.search_runs(
                [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
            )[0]
            metrics = dict(run.data.metrics)
            row = {"benchmark": benchmark, "format": fmt, "seed": seed, "wall_s": took}
            for key in (*METRICS, "cost/frozen_bytes", "cost/peak_mb"):
                if key in metrics:
                    row[key] = metrics[key]
            print(json.dumps(row), flush=True)
            data["runs"].append(row)
            save()


# -- part 2: one layer's dispatch memory ---------------------------------------------------------
PROBE = r"""
import json, re, statistics, sys, time
import torch
from lifelong_moe.moe import MoELayer
fmt = sys.argv[1]
def kib(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
torch.manual_seed(0)
layer = MoELayer(512, 1024, 50, 2, n_frozen=48, frozen_dtype=fmt)
x = torch.randn(1024, 512, requires_grad=True)
def step():
    y, aux = layer(x)
    (y.square().mean() + aux.balance_loss).backward()
step()  # warm-up: allocator, kernels
x.grad = None; layer.zero_grad(set_to_none=True)
before = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
step()
peak = kib("VmHWM") - before
times = []
for _ in range(7):
    x.grad = None; layer.zero_grad(set_to_none=True)
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps({"format": fmt, "frozen_mb": layer.experts.frozen_bytes() / 2**20,
                  "step_peak_mb": peak / 1024, "step_s": statistics.median(times)}))
"""


def probe_all() -> list[dict]:
    rows = []
    for fmt in FORMATS:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, fmt],
            env=ENV,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


# -- tables ---------------------------------------------------------------------------------------
def paired(deltas: list[float]) -> str:
    """mean [95 % t-interval] of paired differences."""
    from scipy import stats

    n = len(deltas)
    mean = statistics.fmean(deltas)
    if n < 2:
        return f"{mean:+.4f}"
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(deltas) / n**0.5
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"


def render(data: dict) -> str:
    runs, probes = data["runs"], data["probes"]
    lines = [
        "# Frozen expert banks in bf16 / int8 / fp8 (issue 25 item 4)",
        "",
        "Reproduce: `.venv/bin/python experiments/frozen_dtype.py` "
        "(tables only: `--render`). See the script's docstring for the protocol.",
        "",
    ]
    for benchmark in BENCHMARKS:
        rows = [r for r in runs if r["benchmark"] == benchmark]
        if not rows:
            continue
        base = {r["seed"]: r for r in rows if r["format"] == "fp32"}
        metrics = [m for m in METRICS if m in rows[0]]
        lines += [
            f"## {benchmark} ({' '.join(BENCHMARKS[benchmark])} method=lifelong_moe, "
            f"{len(base)} seeds)",
            "",
            "Change against fp32 with the same seed: mean [paired 95 % CI]; "
            "ppl/final as a relative change in %. Frozen bytes after the last experience; "
            "peak RSS is the run process's high-water mark (torch + data dominate it).",
            "",
            "| format | frozen bytes | x fp32 | peak RSS (MiB) | "
            + " | ".join(f"Δ {m}" + (" (%)" if METRICS[m] == "percent" else "") for m in metrics)
            + " | mean fp32 value → format |",
            "|---" * (5 + len(metrics)) + "|",
        ]
        for fmt in FORMATS:
            mine = {r["seed"]: r for r in rows if r["format"] == fmt}
            seeds = sorted(set(mine) & set(base))
            if not seeds:
                continue
            stored = statistics.fmean(mine[s]["cost/frozen_bytes"] for s in seeds)
            ref = statistics.fmean(base[s]["cost/frozen_bytes"] for s in seeds)
            cells = []
            for m in metrics:
                if METRICS[m] == "percent":
                    d = [100 * (mine[s][m] / base[s][m] - 1) for s in seeds]
                else:
                    d = [mine[s][m] - base[s][m] for s in seeds]
                cells.append(paired(d))
            main = metrics[0] if benchmark != "text_domains" else "ppl/final"
            values = (
                f"{main}: {statistics.fmean(base[s][main] for s in seeds):.4f} → "
                f"{statistics.fmean(mine[s][main] for s in seeds):.4f}"
            )
            peak = statistics.fmean(mine[s]["cost/peak_mb"] for s in seeds)
            lines.append(
                f"| {fmt} | {stored / 2**20:.3f} MiB | {stored / ref:.3f} | {peak:.0f} | "
                + " | ".join(cells)
                + f" | {values} |"
            )
        lines.append("")
    if probes:
        ref = next(p for p in probes if p["format"] == "fp32")
        lines += [
            "## One layer's step: stored bank, peak memory, time",
            "",
            "MoE layer d 512, h 1024, 48 frozen + 2 trainable experts, 1024 tokens, top-2; one "
            "forward + backward in a fresh process per format, one thread. Peak = resident "
            "high-water mark during the step minus resident memory before it.",
            "",
            "| format | frozen bank | step peak above resident | step time x fp32 |",
            "|---|---|---|---|",
        ]
        for p in probes:
            lines.append(
                f"| {p['format']} | {p['frozen_mb']:.1f} MiB | {p['step_peak_mb']:.1f} MiB | "
                f"{p['step_s'] / ref['step_s']:.2f} |"
            )
        lines.append("")
    lines += data.get("findings", [])
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="tables from results.json only")
    parser.add_argument("--probe-only", action="store_true", help="part 2 only, keep the runs")
    parser.add_argument(
        "--benchmark", choices=sorted(BENCHMARKS), action="append", help="only these (repeatable)"
    )
    options = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": [], "probes": []}

    def save() -> None:
        path.write_text(json.dumps(data, indent=1) + "\n")

    if not options.render:
        if not data["probes"] or options.probe_only:
            data["probes"] = probe_all()
            save()
        if not options.probe_only:
            run_all(data, save, tuple(options.benchmark or BENCHMARKS))
    (RESULTS / "README.md").write_text(render(data))


if __name__ == "__main__":
    main()
