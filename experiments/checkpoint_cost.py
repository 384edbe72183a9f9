"""Checkpoint cost at the default interval: seconds and MB per checkpoint, share of training time.

Runs the real CLI (two experiences each) for moe_mlp + Lifelong-MoE on permuted digits and for
the lm_cpu preset, then reads back, per experience, ``cost/checkpoint_s`` (what training waited
for; part of the training time), ``cost/checkpoint_write_s`` (serialising and writing),
``cost/checkpoint_mb`` (size of one) and the training time. The share is taken within one run
(both times come from the same experience), so it holds on a loaded machine too; the load
average around each case is written beside it.

Then it compares writing in line with writing in a background thread
(``checkpoint.background=false|true``) end to end: the digits case's training time, runs
interleaved, at the default interval and with a checkpoint at every step, reported as the
median ratio background / in line. Writes results/checkpoint_cost.md.

    .venv/bin/python experiments/checkpoint_cost.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lifelong_moe import names
from lifelong_moe.tracking import queries
from lifelong_moe.tracking import store as tracking_store

REPO = Path(__file__).resolve().parent.parent
CASE_DIGITS = "moe_mlp, permuted_digits (5 epochs x 20 steps)"
CASES = {
    CASE_DIGITS: [
        "method=lifelong_moe",
        "model=moe_mlp",
        "benchmark=permuted_digits",
        "benchmark.n_experiences=2",
        "trainer.progress_bar=false",
    ],
    "lm_cpu (1 epoch x 58 steps)": [
        "experiment=lm_cpu",
        "method=lifelong_moe",
        "benchmark.domains=[english,python]",
    ],
}


def measure(args: list[str]) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        cli = Path(sys.executable).parent / "lifelong-moe"
        subprocess.run(
            [str(cli), *args, "tracking.log_checkpoints=false", f"tracking.uri={uri}"],
            cwd=tmp,
            check=True,
            capture_output=True,
        )
        client = tracking_store.client(uri)
        (run,) = queries.search_runs(client, ["1"], queries.EXPERIMENT_RUNS)

        def history(key: str) -> list[float]:
            return queries.metric_history(client, run.info.run_id, key)  # old names too

        train = history(names.COST_TRAIN_S)
        waited, written, checkpoint_mb = (
            history(names.COST_CHECKPOINT_S),
            history(names.COST_CHECKPOINT_WRITE_S),
            history(names.COST_CHECKPOINT_MB),
        )
        return [
            {"train_s": t, "checkpoint_s": c, "write_s": w, "checkpoint_mb": mb}
            for t, c, w, mb in zip(train, waited, written, checkpoint_mb, strict=True)
        ]


def load() -> str:
    """The 1-minute load average (what ``uptime`` shows first) against the machine's cores."""
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def share_table() -> list[str]:
    lines = [
        "share = time training waited for checkpoints / training time of the same experience of",
        "the same run (the wait is part of training time). On this CPU checkpoints are written in",
        "line (checkpoint.background=auto), so the wait is the whole write. Load: 1-minute load",
        "average before and after each case.",
        "",
        "| case | experience | train s | checkpoint s (all) | share | MB per checkpoint | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, args in CASES.items():
        before = load()
        rows = measure(args)
        where = f"{before} -> {load()}"
        for i, row in enumerate(rows):
            share = row["checkpoint_s"] / row["train_s"]
            lines.append(
                f"| {name} | {i} | {row['train_s']:.2f} | {row['checkpoint_s']:.3f} | "
                f"{share:.1%} | {row['checkpoint_mb']:.2f} | {where} |"
            )
    return lines


def background_table(repeats: int = 3) -> list[str]:
    """Training time with checkpoints written in line and in a background thread, interleaved."""
    lines = [
        "",
        "## In line or in a background thread (checkpoint.background), this machine",
        "",
        f"{CASE_DIGITS}: training time of both experiences, {repeats} runs of each, interleaved;",
        "ratio = median background / median in line. `waited` is what training waited for per",
        "checkpoint (gathering the state and copying tensors when in the background).",
        "",
        "| checkpoints | in line: train s | background: train s | ratio | waited per checkpoint, "
        "in line / background | load |",
        "|---|---|---|---|---|---|",
    ]
    # 2 experiences x 5 epochs x 20 steps: a checkpoint at each epoch end (the 100-step interval
    # falls on the last one), or at every step.
    settings = (
        ("default interval", [], 2 * 5),
        ("every step", ["checkpoint.every_n_steps=1"], 2 * 100),
    )
    for label, every, count in settings:
        before = load()
        train: dict[bool, list[float]] = {False: [], True: []}
        waited: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for background in (False, True):
                args = [*CASES[CASE_DIGITS], *every, f"checkpoint.background={background}"]
                rows = measure(args)
                train[background].append(sum(r["train_s"] for r in rows))
                waited[background].append(sum(r["checkpoint_s"] for r in rows) / count)
        inline, threaded = statistics.median(train[False]), statistics.median(train[True])
        lines.append(
            f"| {label} | {inline:.2f} | {threaded:.2f} | {threaded / inline:.2f} | "
            f"{statistics.median(waited[False]) * 1e3:.1f} ms / "
            f"{statistics.median(waited[True]) * 1e3:.1f} ms | {before} -> {load()} |"
        )
    return lines


def main() -> None:
    lines = [
        "# Checkpoint cost at the default interval (checkpoint.every_n_steps=100, and",
        "# every epoch end), per experience. Command: .venv/bin/python experiments/checkpoint_cost.py",
        "",
        *share_table(),
        *background_table(),
    ]
    out = REPO / "results" / "checkpoint_cost.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
