"""Study (issue 4): naive, joint, moe_finetune, lifelong_moe and its ablations on split and
permuted digits, 3 seeds, compared over seeds. One command:

    .venv/bin/python experiments/study_digits.py

Writes results/study_digits/: README.md (tables, the commands, timing), the compare plots, and a
routing heatmap of Lifelong-MoE on permuted digits. The MLflow store is outputs/study_digits/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
STORE = REPO / "outputs" / "study_digits"
RESULTS = REPO / "results" / "study_digits"
URI = f"sqlite:///{STORE / 'mlflow.db'}"
METHODS = "naive,joint,moe_finetune,lifelong_moe,lifelong_moe_no_kd,lifelong_moe_no_freeze"
BENCHMARKS = ("permuted_digits", "split_digits")
SEEDS = "0,1,2"
BIN = Path(sys.executable).parent


def sh(args: list[str]) -> str:
    print("$", " ".join(args), flush=True)
    result = subprocess.run(args, cwd=STORE, check=True, capture_output=True, text=True)
    return result.stdout


def main() -> None:
    if STORE.exists():
        shutil.rmtree(STORE)
    STORE.mkdir(parents=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    commands, timings, tables = [], {}, {}
    for benchmark in BENCHMARKS:
        sweep = [
            str(BIN / "lifelong-moe"),
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"method={METHODS}",
            f"seed={SEEDS}",
            f"benchmark={benchmark}",
            "trainer.max_epochs=3",
            "trainer.progress_bar=false",
            "tracking.log_checkpoints=false",
            f"tracking.uri={URI}",
            f"tracking.sweep_id=study-{benchmark}",
        ]
        start = time.perf_counter()
        sh(sweep)
        timings[benchmark] = time.perf_counter() - start
        compare = [
            str(BIN / "lifelong-moe-compare"),
            f"--tracking-uri={URI}",
            f"--filter=sweep_id=study-{benchmark}",
            f"--plot={RESULTS / benchmark}",
        ]
        tables[benchmark] = sh(compare)
        commands += [" ".join(sweep[1:]), " ".join(compare[1:])]
    client = MlflowClient(URI)
    experiment = client.get_experiment_by_name("lifelong-moe")
    (run,) = client.search_runs(
        [experiment.experiment_id],
        "tags.method = 'lifelong_moe' and tags.benchmark = 'permuted_digits' and tags.seed = '0'",
    )
    client.download_artifacts(run.info.run_id, "routing.png", str(RESULTS))
    client.download_artifacts(run.info.run_id, "routing.json", str(RESULTS))
    lines = ["# Study: Lifelong-MoE and baselines on split and permuted digits", ""]
    lines += [
        "Reproduce: `.venv/bin/python experiments/study_digits.py` (runs, in order:)",
        "",
        "```",
    ]
    lines += [
        f"lifelong-moe {c}" if c.startswith("-m") else f"lifelong-moe-compare {c}" for c in commands
    ]
    lines += ["```", ""]
    for benchmark in BENCHMARKS:
        lines += [f"## {benchmark} (3 seeds, 3 epochs per experience, 5 experiences)", ""]
        lines += [tables[benchmark].strip(), ""]
        lines += [f"Sweep wall time on this machine: {timings[benchmark]:.0f} s.", ""]
        lines += [f"![A_t]({benchmark}/accuracy_curves.png) ![forgetting]({benchmark}/accuracy_forgetting.png)", ""]
    lines += [
        "## Routing of Lifelong-MoE on permuted digits (seed 0)",
        "",
        "![routing](routing.png)",
        "",
    ]
    (RESULTS / "README.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'README.md'}")


if __name__ == "__main__":
    main()
