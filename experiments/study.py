"""Reproducible studies: one command each, 3 seeds, compared over seeds into results/<study>/.

    .venv/bin/python experiments/study.py digits   # issue 4: split + permuted digits, 6 methods
    .venv/bin/python experiments/study.py lm       # issue 7: 4 text domains, lifelong LM pretraining
    .venv/bin/python experiments/study.py routing_lm        # issue 12: routing and forgetting, LM
    .venv/bin/python experiments/study.py routing_lm_long   # issue 12: the same, 3 epochs per domain
    .venv/bin/python experiments/study.py routing_digits    # issue 12: baselines and peers, digits
    .venv/bin/python experiments/study.py ewc_lambda        # issue 12: Avalanche's EWC over lambda
    .venv/bin/python experiments/study.py hf                # issue 22: tiny OLMoE, BPE, 5 seeds

Each study runs Hydra sweeps in parallel (joblib, 2 jobs) into its own MLflow store under
outputs/study_<name>/, then lifelong-moe-compare writes the table and plots; the routing heatmap
of Lifelong-MoE (seed 0) is copied beside them. README.md records the commands and wall times.
Each of the N_JOBS parallel jobs gets its share of the cores (OMP_NUM_THREADS): two jobs with
torch's default threads oversubscribe a 2-core machine several times over.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from lifelong_moe import names
from lifelong_moe.tracking import queries
from lifelong_moe.tracking import store as tracking_store

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMMON = ["trainer.progress_bar=false", "tracking.log_checkpoints=false"]
SEEDS = "0,1,2"  # a study's "seeds" replaces it
N_JOBS = 2
# Issue 12's LM methods; the Thérien recipe (Thérien et al., TMLR 2025): learning-rate re-warming
# and re-decaying at every experience plus a little replay of earlier domains.
THERIEN = [
    "trainer.lr_schedule=cosine_rewarm",
    "trainer.warmup_steps=20",
    "method.replay_fraction=0.05",
]
LM_MOE = "method=moe_finetune,lifelong_moe,lifelong_moe_specialized,joint"


def lm_sweeps(epochs: int) -> dict[str, list[str]]:
    base = ["experiment=lm_cpu", f"trainer.max_epochs={epochs}"]
    return {
        "MoE LM": [*base, LM_MOE],
        "dense LM twin": [*base, "model=lm", "method=naive"],
        "moe_finetune + Thérien": [*base, "method=moe_finetune", *THERIEN]
        + ["method.name=moe_finetune_therien"],
        "lifelong_moe + Thérien": [*base, "method=lifelong_moe", *THERIEN]
        + ["method.name=lifelong_moe_therien"],
    }


DIGITS = "benchmark=split_digits,permuted_digits"
DIGITS_EPOCHS = "trainer.max_epochs=10"
# Avalanche's EWC penalty is lambda * sum(F * (p - p_old)^2) with F a mean of squared batch
# gradients, which is small: a decade grid from routing_digits' 0.4 up to where it stops learning,
# finer between 4000 and 400000, where a first pass of the decades found the trade-off.
EWC_LAMBDAS = "0.4,4,40,400,4000,10000,20000,40000,100000,200000,400000"
# Issue 22: a tiny OLMoE-shaped model (4 layers, d 128, 8 SwiGLU experts top-2, model=olmoe) on
# the 4 built-in text domains tokenized with a byte-level BPE of 2048 ids trained on them; the
# first experience trains it from scratch, the others continue it. expand_init / gate_init are
# left to the model: results/hf_init.md's choice (copy_most_used / random).
HF_MODEL = [
    "model=olmoe",
    "model.config.num_hidden_layers=4",
    "model.config.hidden_size=128",
    "model.config.intermediate_size=128",
    "benchmark=text_domains",
    "benchmark.tokenizer=train:2048",
    "benchmark.context_length=64",
    "benchmark.max_bytes_per_domain=131072",
    "trainer.max_epochs=1",
    "trainer.batch_size=32",
    "trainer.gradient_clip_val=1.0",
]
STUDIES = {
    "hf": {
        "title": "A tiny OLMoE grown over 4 text domains with a trained BPE (model=olmoe)",
        "seeds": "0,1,2,3,4",
        "sweeps": {
            "lifelong_moe": [*HF_MODEL, "method=lifelong_moe"],
            "joint": [*HF_MODEL, "method=joint"],
            "moe_finetune + Thérien": [*HF_MODEL, "method=moe_finetune", *THERIEN]
            + ["method.name=moe_finetune_therien"],
        },
        "plots": {"text_domains": ["benchmark=text_domains"]},
        "routing": ("lifelong_moe", "text_domains"),
    },
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
    "routing_lm": {
        "title": "Routing, specialization and forgetting over 4 text domains (lm_cpu, 1 epoch)",
        "sweeps": lm_sweeps(1),
        "plots": {"text_domains": ["benchmark=text_domains"]},
        "routing": ("lifelong_moe_specialized", "text_domains"),
        "note": "The `naive` row is the dense twin `model=lm`; the other rows use `moe_lm`.",
    },
    "routing_lm_long": {
        "title": "Routing and forgetting over 4 text domains, longer schedule (3 epochs per domain)",
        "sweeps": {
            "MoE LM": [
                "experiment=lm_cpu",
                "trainer.max_epochs=3",
                "method=lifelong_moe,lifelong_moe_specialized,joint",
            ],
            "moe_finetune + Thérien": lm_sweeps(3)["moe_finetune + Thérien"],
        },
        "plots": {"text_domains": ["benchmark=text_domains"]},
        "routing": ("lifelong_moe_specialized", "text_domains"),
    },
    "routing_digits": {
        "title": "Baselines, SEED, Lifelong-MoE and Avalanche's strategies on split and permuted digits",
        "sweeps": {
            "ours": [
                DIGITS,
                "method=naive,ewc,lwf,replay,lifelong_moe,lifelong_moe_no_kd,"
                "lifelong_moe_specialized",
                DIGITS_EPOCHS,
            ],
            # SEED is class-incremental only (its Bayes classifiers are per class).
            "seed": ["benchmark=split_digits", "method=seed", DIGITS_EPOCHS],
            "lifelong_moe + replay": [
                DIGITS,
                "method=lifelong_moe",
                "method.replay_buffer_size=200",
                "method.name=lifelong_moe_replay",
                DIGITS_EPOCHS,
            ],
            **{
                f"Avalanche {strategy}": [
                    DIGITS,
                    "method=avalanche",
                    f"method.strategy={strategy}",
                    f"method.strategy_args={args}",
                    f"method.name=avalanche_{strategy.lower()}",
                    DIGITS_EPOCHS,
                ]
                for strategy, args in (
                    ("EWC", "{ewc_lambda:0.4}"),
                    ("LwF", "{alpha:1.0,temperature:2.0}"),
                    ("Replay", "{mem_size:200}"),
                )
            },
        },
        "plots": {b: [f"benchmark={b}"] for b in ("split_digits", "permuted_digits")},
        "routing": ("lifelong_moe_specialized", "permuted_digits"),
    },
    "ewc_lambda": {
        "title": "Avalanche's EWC on permuted digits over ewc_lambda (routing_digits' settings)",
        "sweeps": {
            "Avalanche EWC": [
                "benchmark=permuted_digits",
                "method=avalanche",
                "method.strategy=EWC",
                "method.strategy_args={ewc_lambda:0.4}",
                f"method.strategy_args.ewc_lambda={EWC_LAMBDAS}",
                # One method name per lambda, so that the comparison keeps them apart.
                "method.name=avalanche_ewc_${method.strategy_args.ewc_lambda}",
                DIGITS_EPOCHS,
            ],
        },
        "note": "The method name carries `ewc_lambda`; Lifelong-MoE at the same epochs is in "
        "[../study_routing_digits](../study_routing_digits/README.md).",
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
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // N_JOBS))}
    plot_sets = study.get("plots")
    for i, (label, overrides) in enumerate(study["sweeps"].items()):
        args = ["-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={N_JOBS}", *overrides]
        args += [*COMMON, f"seed={study.get('seeds', SEEDS)}"]
        args += [
            f"tracking.uri={uri}",
            f"tracking.experiment={name}",
            f"tracking.sweep_id=study-{i}",
        ]
        start = time.perf_counter()
        if not options.tables_only:
            print(f"[{i + 1}/{len(study['sweeps'])}] {label}: lifelong-moe {' '.join(args)}")
            subprocess.run(
                [str(BIN / "lifelong-moe"), *args],
                cwd=store,
                check=True,
                capture_output=True,
                env=env,
            )
        took = "" if options.tables_only else f" ({time.perf_counter() - start:.0f} s)"
        lines += [f"- `lifelong-moe {' '.join(quoted(args))}`{took}"]
        if plot_sets is None:
            # One set of plots per sweep: curves of different benchmarks do not share an axis.
            plots += plot_set(uri, name, label, [f"sweep_id=study-{i}"], results / f"sweep{i}")
    for label, filters in (plot_sets or {}).items():
        plots += plot_set(uri, name, label, filters, results / label)
    args = [f"--tracking-uri={uri}", f"--experiment={name}"]
    table = compare(args)
    lines += [f"- `lifelong-moe-compare {' '.join(quoted(args))}`", ""]
    if not options.tables_only:
        lines += [f"Total wall time on a 2-core CPU: {time.perf_counter() - total:.0f} s.", ""]
    n_seeds = len(study.get("seeds", SEEDS).split(","))
    lines += [f"## Results (mean ± std over {n_seeds} seeds)", "", table.strip(), ""]
    lines += [study["note"], ""] if "note" in study else []
    lines += plots
    client = tracking_store.client(uri)
    experiment_id = queries.experiment_id(client, name)
    lines += per_experience_table(client, experiment_id)
    # The routing heatmap of one MoE run, for studies that have one.
    method, benchmark = study.get("routing", (None, None))
    found = method and queries.search_runs(
        client,
        [experiment_id],
        f"tags.{names.TAG_METHOD} = '{method}' and tags.{names.TAG_BENCHMARK} = '{benchmark}' "
        f"and tags.{names.TAG_SEED} = '0'",
    )
    if found:
        for artifact in (names.ROUTING_PLOT, names.ROUTING_JSON):
            queries.download(client, found[0].info.run_id, artifact, results)
        lines += [
            f"## Routing of {method} on {benchmark} (seed 0)",
            "",
            "![routing](routing.png)",
            "",
        ]
    lines += ["What it shows: [findings.md](findings.md) (written from these numbers by hand)."]
    # Committed files carry no path of this machine: the store is shown relative to the repo.
    text = "\n".join(lines).replace(f"{REPO}/", "")
    (results / "README.md").write_text(text + "\n")
    print(f"wrote {results / 'README.md'}")


def per_experience_table(client: MlflowClient, experiment_id: str) -> list[str]:
    """Final perplexity (or accuracy) on each experience, per method and benchmark: the
    earlier-domain numbers behind ppl/forgetting, which the comparison table averages away."""
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    finished = f"{queries.EXPERIMENT_RUNS} and attributes.status = 'FINISHED'"
    for run in queries.search_runs(client, [experiment_id], finished):
        tags = run.data.tags
        key = (tags.get(names.TAG_METHOD, "?"), tags.get(names.TAG_BENCHMARK, "?"))
        groups.setdefault(key, []).append(names.modernize(run.data.metrics))
    if not groups:
        return []
    language = any(names.PPL_FINAL in m for runs in groups.values() for m in runs)
    prefix = names.PPL if language else names.ACC
    n = max(
        int(k.rsplit("_", 1)[1]) + 1
        for runs in groups.values()
        for m in runs
        for k in m
        if k.startswith(names.exp_metric(prefix, ""))
    )
    columns = [names.exp_metric(prefix, j) for j in range(n)]
    header = ["method", "benchmark", "n", *columns]
    out = [
        f"## Final {'perplexity' if language else 'accuracy'} on each experience "
        "(mean ± std over seeds)",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|" + "---:|" * (len(header) - 2),
    ]
    for (method, benchmark), runs in sorted(groups.items()):
        cells = [method, benchmark, str(len(runs))]
        for column in columns:
            values = [m[column] for m in runs if column in m]
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
            cells.append(f"{mean:.3f} ± {std:.3f}")
        out.append("| " + " | ".join(cells) + " |")
    return [*out, ""]


def quoted(args: list[str]) -> list[str]:
    """Arguments as a shell needs them (braces and '+' in overrides)."""
    return [f"'{a}'" if any(c in a for c in "{}+ ") else a for a in args]


def plot_set(uri: str, name: str, label: str, filters: list[str], folder: Path) -> list[str]:
    """A seen-so-far curve and forgetting bars for the runs that match ``filters``."""
    compare(
        [f"--tracking-uri={uri}", f"--experiment={name}", f"--plot={folder}"]
        + [f"--filter={f}" for f in filters]
    )
    images = [f"![{p.stem}]({folder.name}/{p.name})" for p in sorted(folder.glob("*.png"))]
    return [f"{label}:", "", *images, ""]


def compare(args: list[str]) -> str:
    result = subprocess.run(
        [str(BIN / "lifelong-moe-compare"), *args], check=True, capture_output=True, text=True
    )
    return result.stdout


if __name__ == "__main__":
    main()
