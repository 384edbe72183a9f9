#!/usr/bin/env bash
# Issue 9 on a CUDA machine: checks (no host sync, no graph breaks), the bf16 dispatch benchmark
# at the shapes, and an end-to-end Lifelong-MoE run on the GPU. Writes into ${OUT:-results/gpu}.
# On the lent H100 the stack beyond torch/lightning travels as wheels in .whl (see results/dispatch_*.md).
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi -L | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

echo "== checks" >&2
$PY experiments/gpu_checks.py --json "$OUT/gpu_checks.json" | tee "$OUT/gpu_checks.txt"

echo "== coarse shapes d=1024 h=4096 k=2" >&2
$PY -m lifelong_moe.bench dispatch --device cuda --dtype bf16 --tokens 8192 32768 \
    --experts 8 64 128 --d-model 1024 --d-hidden 4096 --top-k 2 --repeats 10 --warmup 3 \
    --max-gib 20 --json "$OUT/bench_coarse.json" | tee "$OUT/bench_coarse.md"

echo "== fine-grained d=2048 h=768 E=128 k=8" >&2
$PY -m lifelong_moe.bench dispatch --device cuda --dtype bf16 --tokens 8192 32768 \
    --experts 128 --d-model 2048 --d-hidden 768 --top-k 8 --repeats 10 --warmup 3 \
    --max-gib 20 --json "$OUT/bench_fine.json" | tee "$OUT/bench_fine.md"

echo "== compiled, E=64 T=32768" >&2
$PY -m lifelong_moe.bench dispatch --device cuda --dtype bf16 --tokens 32768 --experts 64 \
    --d-model 1024 --d-hidden 4096 --top-k 2 --repeats 10 --warmup 3 --compile --max-gib 20 \
    --json "$OUT/bench_compiled.json" | tee "$OUT/bench_compiled.md"

echo "== end-to-end Lifelong-MoE on the GPU (bf16-mixed)" >&2
for acc in gpu cpu; do
    precision=$([ $acc = gpu ] && echo bf16-mixed || echo 32-true)
    start=$SECONDS
    $PY -m lifelong_moe.cli method=lifelong_moe model=moe_vit \
        benchmark=permuted_digits trainer.max_epochs=3 trainer.accelerator=$acc \
        trainer.precision=$precision trainer.deterministic=false trainer.progress_bar=false \
        tracking.uri="file:$OUT/mlruns" tracking.log_checkpoints=false 2>&1 \
        | grep -E "^\[|acc/final|forgetting|rror" | tee -a "$OUT/end_to_end.txt"
    echo "$acc ($precision): wall $((SECONDS - start)) s" | tee -a "$OUT/end_to_end.txt"
done
