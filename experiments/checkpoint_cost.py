"""Checkpoint cost at the default interval: seconds and MB per checkpoint, share of training time.

Runs the real CLI (two experiences each) for moe_mlp + Lifelong-MoE on permuted digits and for
the lm_cpu preset, then reads back, per experience, ``cost/checkpoint_s`` (what training waited
for: gathering each checkpoint and copying its tensors, part of the training time),
``cost/checkpoint_write_s`` (serialising and writing, in Lightning's background writer thread),
``cost/checkpoint_mb`` (size of one) and the training time. The share is taken within one run (both times come from the same experience), so
it holds on a loaded machine too; the load average around each case is written beside it.
Writes results/checkpoint_cost.md.

    .venv/bin/python experiments/checkpoint_cost.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lifelong_moe.tracking import names, queries
from lifelong_moe.tracking import store as tracking_store

REPO = Path(__file__).resolve().parent.parent
CASES = {
    "moe_mlp, permuted_digits (5 epochs x 20 steps)": [
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


def main() -> None:
    lines = [
        "# Checkpoint cost at the default interval (trainer.checkpoint_every_n_steps=100, and",
        "# every epoch end), per experience. Command: .venv/bin/python experiments/checkpoint_cost.py",
        "",
        "share = time training waited for checkpoints (gathering the state and copying its",
        "tensors) / training time of the same experience of the same run (the wait is part of",
        "training time). The writer thread serialises and writes each checkpoint beside training:",
        "its time is shown as a share of training time too (on a GPU it overlaps free CPU time; on",
        "this 2-core CPU it competes with training for the cores). Load: 1-minute load average",
        "before and after each case.",
        "",
        "| case | experience | train s | waited s (all) | share | writer s (all) | writer share "
        "| MB per checkpoint | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, args in CASES.items():
        before = load()
        rows = measure(args)
        where = f"{before} -> {load()}"
        for i, row in enumerate(rows):
            share = row["checkpoint_s"] / row["train_s"]
            writer_share = row["write_s"] / row["train_s"]
            lines.append(
                f"| {name} | {i} | {row['train_s']:.1f} | {row['checkpoint_s']:.3f} | "
                f"{share:.1%} | {row['write_s']:.2f} | {writer_share:.1%} | "
                f"{row['checkpoint_mb']:.2f} | {where} |"
            )
    out = REPO / "results" / "checkpoint_cost.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
