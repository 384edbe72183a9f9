"""Cost of the training curves: ``tracking.log_every_n_steps=10`` against curves off (0).

Runs the real CLI on ``experiment=lm_cpu`` (4 text domains, 1 epoch of 58 steps each, naive
fine-tuning of the byte-level MoE LM), curves off and on, interleaved in pairs so that the
load of the shared machine hits both alike, one torch thread each. Reads back the training time
of the stream (``cost/train_total_s``, what the callback adds per step) and times the whole
command (which also holds writing the points to MLflow with each experience's row). Reports
the median ratio on/off of each. Writes results/curve_cost.md.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/curve_cost.py [pairs]

On a loaded machine the on/off ratio is noise. So the same command also makes one curves-on run
with the curve work timed from inside: the CPU time of this thread spent in the
``TrainingCurves`` hooks and in writing the points to MLflow (``RunTracker.log_points``),
against the CPU time spent in ``fit`` (training). Thread CPU time counts only what this process
did, however busy the machine is; with one torch thread the training math runs in this thread.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from lifelong_moe import names

REPO = Path(__file__).resolve().parent.parent
ARGS = [
    "experiment=lm_cpu",
    "tracking.log_checkpoints=false",
    "tracking.system_metrics=false",
]
SETTINGS = {"off": "tracking.log_every_n_steps=0", "on": "tracking.log_every_n_steps=10"}


def measure(setting: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "lifelong_moe.cli", *ARGS, setting, f"tracking.uri={uri}"],
            cwd=tmp,
            check=True,
            capture_output=True,
            env=env,
        )
        wall = time.perf_counter() - start
        client = MlflowClient(uri)
        (run,) = client.search_runs(["1"])
        points = sum(
            len(client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics
            if k.startswith(f"{names.CURVE}/")
        )
        return {
            "train_s": run.data.metrics[names.COST_TRAIN_TOTAL_S],
            "wall_s": wall,
            "points": points,
        }


# Runs the CLI with the curve work and training timed in thread CPU seconds; writes them as JSON.
TIMED_CLI = """
import atexit, json, os, sys, time
from lifelong_moe.run import curves, loop
from lifelong_moe.tracking import mlflow_run
spent = {"curves_s": 0.0, "log_points_s": 0.0, "fit_s": 0.0}
def timed(owner, name, key):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[key] += time.thread_time() - start
    setattr(owner, name, wrapper)
for hook in ("on_train_start", "on_train_batch_start", "on_before_optimizer_step",
             "on_train_batch_end", "on_fit_end"):
    timed(curves.TrainingCurves, hook, "curves_s")
timed(mlflow_run.RunTracker, "log_points", "log_points_s")
timed(loop, "fit", "fit_s")
atexit.register(lambda: open(os.environ["CURVE_COST_OUT"], "w").write(json.dumps(spent)))
from lifelong_moe.cli import main
sys.argv = ["lifelong-moe", *sys.argv[1:]]
main()
"""


def measure_inside() -> dict[str, float]:
    """One curves-on run; thread CPU seconds in the curve hooks, in log_points and in fit."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "spent.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env["CURVE_COST_OUT"] = str(out)
        uri = f"sqlite:///{tmp}/mlflow.db"
        subprocess.run(
            [sys.executable, "-c", TIMED_CLI, *ARGS, SETTINGS["on"], f"tracking.uri={uri}"],
            cwd=tmp,
            check=True,
            capture_output=True,
            env=env,
        )
        return json.loads(out.read_text())


INSIDE_HEADING = "## Timed from inside one run"


def inside_section(inside: dict[str, float]) -> str:
    share = (inside["curves_s"] + inside["log_points_s"]) / inside["fit_s"]
    return f"""
{INSIDE_HEADING}

`OMP_NUM_THREADS=1 .venv/bin/python experiments/curve_cost.py --inside` (one curves-on run,
thread CPU seconds, which the machine's load does not inflate; load average at the end
{os.getloadavg()[0]:.2f}): the curve hooks {inside["curves_s"]:.3f} s and writing the points to
MLflow {inside["log_points_s"]:.3f} s, against {inside["fit_s"]:.2f} s of training (`fit`):
**{100 * share:.2f} %** of training time (target: at most 2 %).
"""


def main(pairs: int = 3) -> None:
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for i in range(pairs):
        for setting, override in SETTINGS.items():
            results[setting].append(measure(override))
            print(i, setting, results[setting][-1], flush=True)
    ratio = {
        key: statistics.median(
            on[key] / off[key] for on, off in zip(results["on"], results["off"], strict=True)
        )
        for key in ("train_s", "wall_s")
    }
    rows = "\n".join(
        f"| {i} | {off['train_s']:.2f} | {on['train_s']:.2f} | {off['wall_s']:.1f} | "
        f"{on['wall_s']:.1f} | {on['points']:.0f} |"
        for i, (off, on) in enumerate(zip(results["off"], results["on"], strict=True))
    )
    text = f"""# Cost of the training curves (tracking.log_every_n_steps)

Command: `OMP_NUM_THREADS=1 .venv/bin/python experiments/curve_cost.py {pairs}`
(`lifelong-moe {" ".join(ARGS)}` with `{SETTINGS["off"]}` and `{SETTINGS["on"]}`, interleaved
in pairs, one torch thread each, on the shared 2-core CPU box; load average at the end
{os.getloadavg()[0]:.2f}).

| pair | train_s off | train_s on | wall_s off | wall_s on | curve points logged (on) |
|---|---|---|---|---|---|
{rows}

Median ratio on/off: training time (`{names.COST_TRAIN_TOTAL_S}`) **{ratio["train_s"]:.4f}**,
whole command **{ratio["wall_s"]:.4f}** (target: at most 1.02).
"""
    out = REPO / "results" / "curve_cost.md"
    out.write_text(text + inside_section(measure_inside()))
    print(text)


if __name__ == "__main__":
    if sys.argv[1:] == ["--inside"]:  # only the inside measurement, in place of its section
        out = REPO / "results" / "curve_cost.md"
        kept = out.read_text().split(INSIDE_HEADING)[0].rstrip() + "\n"
        out.write_text(kept + inside_section(measure_inside()))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
