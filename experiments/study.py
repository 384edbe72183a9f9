"""Reproducible studies: one command each, 3 seeds, compared over seeds into results/<study>/.

    .venv/bin/python experiments/study.py digits   # issue 4: split + permuted digits, 6 methods
    .venv/bin/python experiments/study.py lm       # issue 7: 4 text domains, lifelong LM pretraining

Each study runs Hydra sweeps in parallel (joblib, 2 jobs) into its own MLflow store under
outputs/study_<name>/, then lifelong-moe-compare writes the table and plots; the routing heatmap
of Lifelong-MoE (seed 0) is copied beside them. README.md records the commands and wall times.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMMON = ["trainer.progress_bar=false", "tracking.log_checkpoints=false", "seed=0,1,2"]
STUDIES = {
    "digits": {
        "title": "Lifelong-MoE, its ablations and baselines on split and permuted digits",
        "sweeps": {
            benchmark: [
                f"benchmark={benchmark}",
                "method=naive,joint,moe_finetune,lifelong_moe,lifelong_moe_no_kd,lifelong_moe_no_freeze",
                "trainer.max_epochs=3",
            ]
            for benchmark in ("permuted_digits", "split_digits")
        },
        "routing": ("lifelong_moe", "permuted_digits"),
    },
    "lm": {
        "title": "Lifelong language-model pretraining over 4 text domains (experiment=lm_cpu)",
        "sweeps": {
            "text_domains (MoE LM)": [
                "experiment=lm_cpu",
                "method=lifelong_moe,moe_finetune,joint",
            ],
            "text_domains (dense LM twin)": ["experiment=lm_cpu", "model=lm", "method=naive"],
        },
        "routing": ("lifelong_moe", "text_domains"),
        "note": "The `naive` row is the dense twin `model=lm`; the other rows use `moe_lm`.",
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument(
        "--tables-only", action="store_true", help="reuse the runs already in the study's store"
    )
    options = parser.parse_args()
    study = STUDIES[options.study]
    name = f"study_{options.study}"
    store, results = REPO / "outputs" / name, REPO / "results" / name
    uri = f"sqlite:///{store / 'mlflow.db'}"
    if not options.tables_only:
        shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Study: {study['title']}",
        "",
        f"Reproduce: `.venv/bin/python {Path(__file__).relative_to(REPO)} {options.study}`",
        "",
    ]
    plots: list[str] = []
    total = time.perf_counter()
    for i, (label, overrides) in enumerate(study["sweeps"].items()):
        args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *overrides, *COMMON]
        args += [
            f"tracking.uri={uri}",
            f"tracking.experiment={name}",
            f"tracking.sweep_id=study-{i}",
        ]
        start = time.perf_counter()
        if not options.tables_only:
            print(f"[{i + 1}/{len(study['sweeps'])}] {label}: lifelong-moe {' '.join(args)}")
            subprocess.run(
                [str(BIN / "lifelong-moe"), *args], cwd=store, check=True, capture_output=True
            )
        took = "" if options.tables_only else f" ({time.perf_counter() - start:.0f} s)"
        lines += [f"- `lifelong-moe {' '.join(args)}`{took}"]
        # One set of plots per sweep: curves of different benchmarks do not share an axis.
        folder = results / f"sweep{i}"
        compare(
            [
                f"--tracking-uri={uri}",
                f"--experiment={name}",
                f"--filter=sweep_id=study-{i}",
                f"--plot={folder}",
            ]
        )
        plots += (
            [f"{label}:", ""]
            + [f"![{p.stem}]({folder.name}/{p.name})" for p in sorted(folder.glob("*.png"))]
            + [""]
        )
    args = [f"--tracking-uri={uri}", f"--experiment={name}"]
    table = compare(args)
    lines += [f"- `lifelong-moe-compare {' '.join(args)}`", ""]
    if not options.tables_only:
        lines += [f"Total wall time on a 2-core CPU: {time.perf_counter() - total:.0f} s.", ""]
    lines += ["## Results (mean ± std over 3 seeds)", "", table.strip(), ""]
    lines += [study["note"], ""] if "note" in study else []
    lines += plots
    method, benchmark = study["routing"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    found = client.search_runs(
        [experiment.experiment_id],
        f"tags.method = '{method}' and tags.benchmark = '{benchmark}' and tags.seed = '0'",
    )
    if found:
        for artifact in ("routing.png", "routing.json"):
            client.download_artifacts(found[0].info.run_id, artifact, str(results))
        lines += [
            f"## Routing of {method} on {benchmark} (seed 0)",
            "",
            "![routing](routing.png)",
            "",
        ]
    lines += ["What it shows: [findings.md](findings.md) (written from these numbers by hand)."]
    (results / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {results / 'README.md'}")


def compare(args: list[str]) -> str:
    result = subprocess.run(
        [str(BIN / "lifelong-moe-compare"), *args], check=True, capture_output=True, text=True
    )
    return result.stdout


if __name__ == "__main__":
    main()
