"""Append one lm_gpu run's throughput per experience (from its MLflow store) as a JSON line.

python experiments/gpu_lm_metrics.py STORE_URI RUN_NAME OUT.jsonl [--config KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import sys

from mlflow.tracking import MlflowClient

from lifelong_moe import names

METRICS = [
    names.COST_TOKENS_PER_S,
    names.COST_MFU,
    names.COST_TRAIN_S,
    names.COST_PEAK_MB,
    names.COST_CHECKPOINT_S,
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("run_name")
    parser.add_argument("out")
    parser.add_argument("--config", nargs="*", default=[], help="KEY=VALUE recorded with the row")
    args = parser.parse_args()
    client = MlflowClient(args.uri)
    runs = [
        run
        for exp in client.search_experiments()
        for run in client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.runName` = '{args.run_name}'"
        )
    ]
    row: dict = {"run_name": args.run_name, "config": dict(c.split("=", 1) for c in args.config)}
    if not runs:
        row["error"] = "no run of that name in the store"
    else:
        run = runs[0]
        row["status"] = run.info.status
        per_exp: dict[int, dict] = {}
        for metric in METRICS:
            for m in client.get_metric_history(run.info.run_id, metric):
                per_exp.setdefault(m.step, {})[metric] = m.value
        row["experiences"] = [{"experience": s, **v} for s, v in sorted(per_exp.items())]
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0 if "error" not in row else 1


if __name__ == "__main__":
    sys.exit(main())
