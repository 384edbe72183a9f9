"""Reproducible studies: one command each, 5 seeds, compared over seeds into results/<study>/.

    .venv/bin/python experiments/study.py digits   # issue 4: split + permuted digits, 6 methods
    .venv/bin/python experiments/study.py lm       # issue 7: 4 text domains, lifelong LM pretraining
    .venv/bin/python experiments/study.py routing_lm        # issue 12: routing and forgetting, LM
    .venv/bin/python experiments/study.py routing_lm_long   # issue 12: the same, 3 epochs per domain
    .venv/bin/python experiments/study.py routing_digits    # issue 12: baselines and peers, digits
    .venv/bin/python experiments/study.py ewc_lambda        # issue 12: Avalanche's EWC over lambda
    .venv/bin/python experiments/study.py ablations_digits  # issue 24: the reviewer's ablations
    .venv/bin/python experiments/study.py ablations_lm      # issue 24: the same on text
    .venv/bin/python experiments/study.py hf                # issue 22: tiny OLMoE, BPE, 5 seeds
    .venv/bin/python experiments/study.py hf_selection --seeds seed=0 --split validation
                                                            # issue 22: hf's epochs and LR
    .venv/bin/python experiments/study.py routing_lm_exploration --seeds seed=0 --split validation
                                                            # issue 24: the router grid, seed 0

Each study runs Hydra sweeps in parallel (joblib, 2 jobs) into its own MLflow store under
outputs/study_<name>/, then lifelong-moe-compare writes the table and plots; the routing heatmap
of Lifelong-MoE (seed 0) is copied beside them. README.md records the commands and wall times;
comparison.json holds the table's numbers, which experiments/render.py renders into README.md
and the findings. A study resumes: a (method, benchmark, seed) run already FINISHED in the
study's store is not run again (``--fresh`` starts over), so a long study can span sittings.
Each of the N_JOBS parallel jobs (``--jobs``) gets its share of the cores (OMP_NUM_THREADS, unless
the caller sets it): two jobs with torch's default threads oversubscribe a 2-core machine several
times over.

Protocol (issue 24): settings are chosen on validation, studies report test. Every benchmark
holds out both with the same training data: the digits studies through DIGITS_VALIDATION, the
text studies (lm, routing_lm, routing_lm_long, ablations_lm, hf, routing_lm_exploration) because
text_domains always holds out validation and test documents per domain. ``--split validation``
evaluates the validation set (into study_<name>_validation) for making a choice; the plain
command reports test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lifelong_moe import names
from lifelong_moe.evaluation.metrics import mean_std
from lifelong_moe.methods.lr_schedule import LRSchedule
from lifelong_moe.tracking import queries
from lifelong_moe.tracking import store as tracking_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
import render  # noqa: E402  (experiments/render.py, beside this file)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SEEDS = "seed=0,1,2,3,4"  # headline rows: >= 5 seeds, paired CIs (compare --reference)
COMMON = ["trainer.progress_bar=false", "tracking.log_checkpoints=false", SEEDS]
N_JOBS = 2
# Issue 12's LM methods; the Thérien recipe (Thérien et al., TMLR 2025): learning-rate re-warming
# and re-decaying at every experience plus a little replay of earlier domains.
THERIEN = [
    "schedule.name=cosine_rewarm",
    "schedule.warmup_steps=20",
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


# The recipe's learning-rate area: cosine_rewarm with 20 warm-up steps in an experience of
# LM_STEPS steps has mean factor ~0.52 of constant LR; the area-matched peer scales method.lr by
# its inverse. lm_cpu, 1 epoch, split by document: 22-57 optimizer steps per domain, 48.5 on
# average over the 4 domains and seeds 0-4 (58 for every domain before the document split).
LM_STEPS = 49
LM_LR = 1e-3  # conf/method/*.yaml lr


def lr_area(schedule: LRSchedule, steps: int, experience: int = 1) -> float:
    """Mean LR factor over one experience's optimizer steps (1.0 = constant LR)."""
    return sum(schedule.factor(i, steps, experience) for i in range(steps)) / steps


AREA_MATCHED_LR = LM_LR / lr_area(LRSchedule("cosine_rewarm", warmup_steps=20), LM_STEPS)
# The infinite schedule (Ibrahim et al. 2024): warm-up and cool-down to a constant level on the
# first domain only, then constant, the last steps of each domain annealed to the floor.
INFINITE = [
    "schedule.name=infinite",
    "schedule.warmup_steps=20",
    "schedule.cooldown_steps=20",
    "schedule.anneal_steps=10",
    "method.replay_fraction=0.05",
]


def routing_ablations(
    base: list[str], n_experts_at_end: int, dense: list[str]
) -> dict[str, list[str]]:
    """Issue 24's reviewer ablations on one benchmark (``base``: its overrides):
    Lifelong-MoE with task inference and masking against oracle routing (the true experience)
    and shuffled labels (each inferred experience rotated to a wrong one), the paper-faithful
    lifelong_moe, moe_finetune with as many experts from the start as Lifelong-MoE ends with
    (capacity-matched), and the dense peer given the same side information: ``dense_heads``,
    the dense twin (``dense``: its model override) with one head per experience chosen by the
    same inferred experience, and by the oracle."""
    specialized = [*base, "method=lifelong_moe_specialized"]
    peer = [*base, *dense, "method=dense_heads"]
    return {
        "lifelong_moe (paper) and + task inference": [
            *base,
            "method=lifelong_moe,lifelong_moe_specialized",
        ],
        "+ task inference, oracle routing": [
            *specialized,
            "method.infer_source=oracle",
            "method.name=lifelong_moe_specialized_oracle",
        ],
        "+ task inference, shuffled labels": [
            *specialized,
            "method.infer_source=shuffled",
            "method.name=lifelong_moe_specialized_shuffled",
        ],
        "moe_finetune, capacity-matched": [
            *base,
            "method=moe_finetune",
            f"model.n_experts={n_experts_at_end}",
            f"method.name=moe_finetune_{n_experts_at_end}experts",
        ],
        "dense peer: a head per experience, inferred experience": peer,
        "dense peer: a head per experience, oracle": [
            *peer,
            "method.infer_source=oracle",
            "method.name=dense_heads_oracle",
        ],
    }


DIGITS = "benchmark=split_digits,permuted_digits"
DIGITS_EPOCHS = "trainer.max_epochs=10"
# Held out of the training part (stratified, seeded): settings are chosen with --split
# validation, the study reports test; the training data is the same in both.
DIGITS_VALIDATION = "benchmark.validation_fraction=0.2"
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
    # Chosen on validation by hf_selection (results/study_hf/selection.md): 3 epochs per domain
    # at lr 3e-3 (ppl/final 429 against 524 at 1e-2 and 804-887 at 1 epoch), for every method.
    "trainer.max_epochs=3",
    "method.lr=0.003",
    "trainer.batch_size=32",
    "trainer.gradient_clip_val=1.0",
]
# Choosing study hf's epochs per domain and learning rate (issue 24's protocol: on validation,
# seed 0, method lifelong_moe; the choice then holds for every method of study hf), in two
# rounds: 1 epoch at three learning rates, then 3 epochs at the two best of them (1e-3 was the
# worst at 1 epoch on ppl/final and on 3 of the 4 domains: results/study_hf/selection.md).
#     experiments/study.py hf_selection --seeds seed=0 --split validation
HF_SELECTION = {"1 epoch": ("1", "0.001,0.003,0.01"), "3 epochs": ("3", "0.003,0.01")}
STUDIES = {
    "hf_selection": {
        "title": "Study hf's epochs and learning rate, chosen on validation (lifelong_moe, seed 0)",
        "sweeps": {
            label: [
                *(o for o in HF_MODEL if not o.startswith(("trainer.max_epochs=", "method.lr="))),
                "method=lifelong_moe",
                f"trainer.max_epochs={epochs}",
                f"method.lr={lrs}",
                # One method name per setting, so that the comparison keeps them apart.
                "method.name=lifelong_moe_e${trainer.max_epochs}_lr${method.lr}",
            ]
            for label, (epochs, lrs) in HF_SELECTION.items()
        },
    },
    "hf": {
        "title": "A tiny OLMoE grown over 4 text domains with a trained BPE (model=olmoe)",
        # joint last: it trains on every domain seen so far, the longest run by far.
        "sweeps": {
            "lifelong_moe": [*HF_MODEL, "method=lifelong_moe"],
            "moe_finetune + Thérien": [*HF_MODEL, "method=moe_finetune", *THERIEN]
            + ["method.name=moe_finetune_therien"],
            "joint": [*HF_MODEL, "method=joint"],
        },
        "reference": "lifelong_moe",
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
        "reference": "lifelong_moe",
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
        "reference": "lifelong_moe",
        "note": "The `naive` row is the dense twin `model=lm`; the other rows use `moe_lm`.",
    },
    "routing_lm": {
        "title": "Routing, specialization and forgetting over 4 text domains (lm_cpu, 1 epoch)",
        "sweeps": lm_sweeps(1),
        "plots": {"text_domains": ["benchmark=text_domains"]},
        "routing": ("lifelong_moe_specialized", "text_domains"),
        "reference": "lifelong_moe",
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
        "reference": "lifelong_moe",
    },
    "routing_digits": {
        "title": "Baselines, SEED, Lifelong-MoE and Avalanche's strategies on split and permuted digits",
        "sweeps": {
            "ours": [
                DIGITS,
                "method=naive,ewc,lwf,replay,lifelong_moe,lifelong_moe_no_kd,"
                "lifelong_moe_specialized",
                DIGITS_EPOCHS,
                DIGITS_VALIDATION,
            ],
            # SEED is class-incremental only (its Bayes classifiers are per class).
            "seed": ["benchmark=split_digits", "method=seed", DIGITS_EPOCHS, DIGITS_VALIDATION],
            "lifelong_moe + replay": [
                DIGITS,
                "method=lifelong_moe",
                "method.replay_buffer_size=200",
                "method.name=lifelong_moe_replay",
                DIGITS_EPOCHS,
                DIGITS_VALIDATION,
            ],
            **{
                f"Avalanche {strategy}": [
                    DIGITS,
                    "method=avalanche",
                    f"method.strategy={strategy}",
                    f"method.strategy_args={args}",
                    f"method.name=avalanche_{strategy.lower()}",
                    DIGITS_EPOCHS,
                    DIGITS_VALIDATION,
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
        "reference": "lifelong_moe",
    },
    "ablations_digits": {
        "title": "Issue 24's ablations on permuted digits (10 epochs): routing source, capacity",
        # 5 experiences, 4 experts + 2 per later experience: 12 at the end
        "sweeps": routing_ablations(
            ["benchmark=permuted_digits", DIGITS_EPOCHS, DIGITS_VALIDATION], 12, ["model=mlp"]
        ),
        "routing": ("lifelong_moe_specialized", "permuted_digits"),
        "reference": "lifelong_moe",
    },
    "ablations_lm": {
        "title": "Issue 24's ablations on 4 text domains (lm_cpu, 1 epoch): routing, capacity, "
        "the recipe with LR area matched and with the infinite schedule",
        "sweeps": {
            # 4 domains, 4 experts + 2 per later domain: 10 at the end
            **routing_ablations(["experiment=lm_cpu", "trainer.max_epochs=1"], 10, ["model=lm"]),
            "moe_finetune + Thérien, LR area matched": [
                "experiment=lm_cpu",
                "trainer.max_epochs=1",
                "method=moe_finetune",
                *THERIEN,
                f"method.lr={AREA_MATCHED_LR:.6g}",
                "method.name=moe_finetune_therien_area",
            ],
            "moe_finetune + infinite schedule": [
                "experiment=lm_cpu",
                "trainer.max_epochs=1",
                "method=moe_finetune",
                *INFINITE,
                "method.name=moe_finetune_infinite",
            ],
        },
        "routing": ("lifelong_moe_specialized", "text_domains"),
        "reference": "lifelong_moe",
    },
    "routing_lm_exploration": {
        "title": "Which router options make Lifelong-MoE's experts specialise (lm_cpu, 1 epoch): "
        "results/study_routing_lm/exploration.md's grid, to be run on validation, seed 0",
        # In order of what to run first; each configuration is its own method name.
        "sweeps": {
            "A: lifelong_moe": ["experiment=lm_cpu", "method=lifelong_moe"],
            "F: + inferred routing, bonus 2, routing distillation, balance over new experts "
            "(the preset)": ["experiment=lm_cpu", "method=lifelong_moe_specialized"],
            "B: + inferred routing, bonus 2": [
                "experiment=lm_cpu",
                "method=lifelong_moe",
                "method.infer_routing=true",
                "method.infer_bonus=2",
                "method.name=lifelong_moe_infer2",
            ],
            "E: + inferred routing, bonus 5": [
                "experiment=lm_cpu",
                "method=lifelong_moe",
                "method.infer_routing=true",
                "method.infer_bonus=5",
                "method.name=lifelong_moe_infer5",
            ],
            "D: routing distillation, balance over new experts": [
                "experiment=lm_cpu",
                "method=lifelong_moe",
                "method.lambda_router=1",
                "model.balance_scope=trainable",
                "method.name=lifelong_moe_router_kd",
            ],
            "G: the preset with bonus 5": [
                "experiment=lm_cpu",
                "method=lifelong_moe_specialized",
                "method.infer_bonus=5",
                "method.name=lifelong_moe_specialized_bonus5",
            ],
            "C: B + frozen shared weights": [
                "experiment=lm_cpu",
                "method=lifelong_moe",
                "method.infer_routing=true",
                "method.infer_bonus=2",
                "method.freeze_shared=true",
                "method.name=lifelong_moe_infer2_freeze_shared",
            ],
        },
        "plots": {"text_domains": ["benchmark=text_domains"]},
        "routing": ("lifelong_moe_specialized", "text_domains"),
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
                DIGITS_VALIDATION,
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
    parser.add_argument(
        "--fresh", action="store_true", help="delete the study's store first (default: resume)"
    )
    parser.add_argument("--seeds", default=SEEDS, help="seed override (default: %(default)s)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seed 0, 1 epoch, into outputs/<study>-smoke/ (results too): checks the pipeline",
    )
    parser.add_argument(
        "--split",
        choices=["test", "validation"],
        default="test",
        help="held-out set to evaluate (validation: for choosing settings; into study_<name>"
        "_validation) (default: %(default)s)",
    )
    parser.add_argument(
        "--jobs", type=int, default=N_JOBS, help="runs at once (default: %(default)s)"
    )
    options = parser.parse_args()
    study = STUDIES[options.study]
    name = f"study_{options.study}" + ("_validation" if options.split == "validation" else "")
    store, results = REPO / "outputs" / name, REPO / "results" / name
    extra = []
    if options.smoke:
        store = REPO / "outputs" / f"{name}-smoke"
        render.RESULTS = store / "results"
        results = render.RESULTS / name
        options.seeds, extra = "seed=0", ["trainer.max_epochs=1"]
    if options.split == "validation":
        extra.append("benchmark.split=validation")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    if options.fresh and not options.tables_only:
        shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Study: {study['title']}",
        "",
        f"Reproduce: `.venv/bin/python {Path(__file__).relative_to(REPO)} {reproduce(options)}`",
        "",
    ]
    plots: list[str] = []
    total = time.perf_counter()
    share = str(max(1, (os.cpu_count() or 2) // options.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", share)}
    plot_sets = study.get("plots")
    common = [o if not o.startswith("seed=") else options.seeds for o in COMMON]
    for i, (label, overrides) in enumerate(study["sweeps"].items()):
        args = ["-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={options.jobs}", *overrides]
        # smoke and split overrides replace the sweep's own values of the same keys
        keys = {o.partition("=")[0] for o in extra}
        args = [a for a in args if a.partition("=")[0] not in keys] + common + extra
        args += [
            f"tracking.uri={uri}",
            f"tracking.experiment={name}",
            f"tracking.sweep_id=study-{i}",
        ]
        start = time.perf_counter()
        if not options.tables_only:
            todo = unfinished(args, finished_runs(uri, name))
            print(f"[{i + 1}/{len(study['sweeps'])}] {label}: {len(todo)} sweep(s) to run")
            for sweep in todo:
                print(f"  lifelong-moe {' '.join(sweep)}")
                run_sweep(sweep, store, env)
        took = "" if options.tables_only else f" ({time.perf_counter() - start:.0f} s)"
        lines += [f"- `lifelong-moe {' '.join(quoted(args))}`{took}"]
        if plot_sets is None:
            # One set of plots per sweep: curves of different benchmarks do not share an axis.
            plots += plot_set(uri, name, label, [f"sweep_id=study-{i}"], results / f"sweep{i}")
    for label, filters in (plot_sets or {}).items():
        plots += plot_set(uri, name, label, filters, results / label)
    args = [f"--tracking-uri={uri}", f"--experiment={name}"]
    reference = study.get("reference")
    paired = [f"--reference={reference}"] if reference else []
    table = json.loads(compare([*args, "--format=json", *paired]))
    lines += [f"- `lifelong-moe-compare {' '.join(quoted(args + paired))}`", ""]
    wall_s = time.perf_counter() - total
    if not options.tables_only:
        lines += [f"Total wall time on a 2-core CPU: {wall_s:.0f} s.", ""]
    client = tracking_store.client(uri)
    experiment_id = queries.experiment_id(client, name)
    columns = [c for c in table["rows"][0]["metrics"]] if table["rows"] else []
    data = {
        "source": "lifelong-moe-compare --format json over the study's store",
        "columns": columns,
        "rows": table["rows"],
        "per_experience": per_experience_rows(client, experiment_id),
        **({"wall_s": wall_s} if not options.tables_only else {}),
        **({"reference": reference, "paired": table["paired"]} if reference else {}),
    }
    (results / render.COMPARISON).write_text(json.dumps(data, indent=1) + "\n")
    lines += [
        f"## Results (mean ± std over {render.KINDS['seeds'](name)} seeds)",
        "",
        f"<!-- render:results {name} -->x<!-- /render -->",
        "",
    ]
    if reference:
        lines += [f"<!-- render:paired {name} -->x<!-- /render -->", ""]
    lines += [study["note"], ""] if "note" in study else []
    lines += plots
    if data["per_experience"]:
        lines += [
            "## Final accuracy (perplexity) on each experience (mean ± std over seeds)",
            "",
            f"<!-- render:per_experience {name} -->x<!-- /render -->",
            "",
        ]
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
    (results / "README.md").write_text(render.render_text(text + "\n"))
    print(f"wrote {results / 'README.md'}")


def reproduce(options: argparse.Namespace) -> str:
    """The study's command line: its name and the options that differ from the defaults."""
    words = [options.study]
    words += [f"--seeds {options.seeds}"] if options.seeds != SEEDS else []
    words += [f"--split {options.split}"] if options.split != "test" else []
    words += [f"--jobs {options.jobs}"] if options.jobs != N_JOBS else []
    return " ".join(words)


def per_experience_rows(client: MlflowClient, experiment_id: str) -> list[dict]:
    """Final perplexity (or accuracy) on each experience, per method and benchmark: the
    earlier-domain numbers behind ppl/forgetting, which the comparison table averages away.
    Rows shaped like lifelong-moe-compare's JSON rows (mean, sample std, n per metric)."""
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
    rows = []
    for (method, benchmark), runs in sorted(groups.items()):
        metrics = {}
        for column in (names.exp_metric(prefix, j) for j in range(n)):
            mean, std, count = mean_std([m.get(column, math.nan) for m in runs])
            metrics[column] = {"mean": None if count == 0 else mean, "std": std, "n": count}
        rows.append({"method": method, "benchmark": benchmark, "n": len(runs), "metrics": metrics})
    return rows


def sweep_values(override: str) -> list[str]:
    """The alternatives of one override (``key=a,b``); a value in braces or brackets is one."""
    key, _, value = override.partition("=")
    if not _ or value[:1] in "{[" or "," not in value or key.startswith("hydra"):
        return [override]
    return [f"{key}={v}" for v in value.split(",")]


def identity(overrides: list[str]) -> tuple[str, str, str]:
    """(method, benchmark, seed) tags the run of one job will carry, from its composed config."""
    keep = [o for o in overrides if not o.startswith(("hydra", "-m"))]
    cfg = compose("config", keep)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return (
        resolved["method"].get("name", "method"),
        resolved["benchmark"].get("name", "?"),
        str(resolved["seed"]),
    )


def run_sweep(sweep: list[str], store: Path, env: dict[str, str]) -> None:
    """One ``lifelong-moe -m`` sweep; on failure, its last output lines and how to resume, not a
    bare CalledProcessError (the finished runs stay in the store and are skipped next time)."""
    result = subprocess.run(
        [str(BIN / "lifelong-moe"), *sweep], cwd=store, capture_output=True, text=True, env=env
    )
    if result.returncode:
        tail = (result.stdout + result.stderr).strip().splitlines()[-30:]
        print("\n".join(["    " + line for line in tail]), file=sys.stderr)
        sys.exit(
            f"study: the sweep above exited with {result.returncode} (its runs' logs are under "
            f"{store / 'multirun'}); run the same study command again to resume"
        )


def unfinished(args: list[str], done: set[tuple[str, str, str]]) -> list[list[str]]:
    """The sweeps still to run: ``args``' jobs minus those already FINISHED in the store, the
    remaining seeds of each job regrouped into one sweep (so that joblib still runs 2 at once)."""
    axes = [sweep_values(a) for a in args]
    todo: dict[tuple[str, ...], list[str]] = {}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for job in itertools.product(*axes):
            if identity(list(job)) in done:
                continue
            rest = tuple(o for o in job if not o.startswith("seed="))
            todo.setdefault(rest, []).extend(o for o in job if o.startswith("seed="))
    return [
        [*rest, "seed=" + ",".join(s.partition("=")[2] for s in seeds)]
        for rest, seeds in todo.items()
    ]


def finished_runs(uri: str, experiment: str) -> set[tuple[str, str, str]]:
    """(method, benchmark, seed) of every FINISHED run in the study's store."""
    client = tracking_store.client(uri)
    experiment_id = queries.experiment_id(client, experiment)
    if experiment_id is None:  # nothing run yet
        return set()
    finished = f"{queries.EXPERIMENT_RUNS} and attributes.status = 'FINISHED'"
    return {
        (
            r.data.tags.get(names.TAG_METHOD, ""),
            r.data.tags.get(names.TAG_BENCHMARK, ""),
            r.data.tags.get(names.TAG_SEED, ""),
        )
        for r in queries.search_runs(client, [experiment_id], finished)
    }


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
