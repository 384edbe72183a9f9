#!/usr/bin/env bash
# Reproduces results/dispatch_cpu.md: the grouped MoE dispatch vs dense-active, the per-expert
# loop, GShard one-hot einsum and all-experts-dense, plus the 7/8-frozen training step.
# fp32 on 2 CPU threads; takes about 5 minutes; raw numbers go to outputs/dispatch_cpu.json.
# Other processes on a shared machine add noise: the cases are interleaved repeat by repeat and
# the median of the repeats is reported (the JSON keeps every repeat).
# Usage: experiments/bench_dispatch.sh [extra lifelong-moe-bench options]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p outputs
"$PY" -m lifelong_moe.bench dispatch \
  --device cpu --threads 2 --dtype fp32 \
  --tokens 8192 --experts 16 64 \
  --d-model 256 --d-hidden 1024 --top-k 2 \
  --warmup 1 --repeats 9 --frozen-fraction 0.875 --max-gib 4 \
  --json outputs/dispatch_cpu.json "$@"
