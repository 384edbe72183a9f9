#!/usr/bin/env bash
# Issue 26 in one command on a lent H200: every result goes into OUTDIR, most important first, so
# that a run cut off at any point still returns what it finished. At most 8 files (what the device
# tool brings back from $OUT): session.log, steps.jsonl, preflight.json, cuda_tests.xml,
# gpu_checks.json, dispatch.jsonl, lm_gpu.jsonl, imports.json.
#
#   experiments/gpu_session.sh OUTDIR          # on the GPU machine, from the repository root,
#                                              # with .whl/ from experiments/gpu_wheels.sh carried
#   experiments/gpu_session.sh OUTDIR --dry    # here: CPU, tiny shapes, Triton interpreter
#
# Order: preflight (versions, APIs) -> CUDA tests and checks -> dispatch benchmark eager (E=64
# T=32768 and 8192, then the fine-grained shape) -> compiled at E=64 T=32768 -> lm_gpu grouped
# and fused at batch 64 -> compiled fine-grained -> lm_gpu at batch 128 and compiled -> the
# import check. Each step runs under a timeout; steps that would start past the budget
# (GPU_SESSION_BUDGET_S, 360 s) are recorded as skipped. Render with experiments/gpu_report.py.
# --dry runs the same steps with tiny shapes on CPU (the fused kernels under TRITON_INTERPRET=1,
# torch.compile with the eager backend) and hides every package the GPU machine lacks that the
# wheel list does not bring (experiments/gpu_imports.py), so a missing wheel fails here first.
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [--dry]" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
DRY=0
[ "${2:-}" = "--dry" ] && DRY=1
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PY:-python3}
BUDGET=${GPU_SESSION_BUDGET_S:-360}
WORK=$(mktemp -d)
LOG=$OUT/session.log
STEPS=$OUT/steps.jsonl
TRACES=$WORK/traces
mkdir -p "$TRACES"
: >"$STEPS"
: >"$LOG"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_CACHE_DIR=$WORK/triton_cache
export PYTHONPATH=$REPO  # the checkout itself: pip never resolves lifelong-moe's torch pin

if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1 GPU_SESSION_HIDE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
elif compgen -G ".whl/*.whl" >/dev/null; then
  # the machine has no package index: the carried wheels, without their dependencies
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed" >>"$LOG"
  export PYTHONPATH=$REPO:$WORK/site
fi

# step NAME TIMEOUT_S COMMAND...: run under the remaining budget, log, record rc and seconds.
# Python commands run through gpu_imports.py trace, which records what each imports.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  local cmd
  cmd=$(printf '%q ' "$@")
  cmd=${cmd//$OUT/OUTDIR}
  cmd=${cmd//$WORK/WORK}
  cmd=${cmd//$REPO\//}
  local json_cmd=${cmd//\\/\\\\}  # JSON string: backslashes, then quotes, escaped
  json_cmd=${json_cmd//\"/\\\"}
  if [ $left -lt 15 ]; then
    printf '{"step": "%s", "skipped": "budget", "command": "%s"}\n' "$name" "$json_cmd" >>"$STEPS"
    return
  fi
  [ "$limit" -gt $left ] && limit=$left
  echo "== [$SECONDS s] $name (timeout $limit s): $cmd" | tee -a "$LOG" >&2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d, "timeout_s": %d, "command": "%s"}\n' \
    "$name" $rc $((SECONDS - t0)) "$limit" "$json_cmd" >>"$STEPS"
}
traced() {  # traced NAME ARGS...: python with the import trace named NAME
  local name=$1
  shift
  echo "$PY" experiments/gpu_imports.py trace "$TRACES/$name.json" "$@"
}

# Shapes: "E T d h k" per benchmark step; lm configs: "dispatch batch compile".
if [ $DRY = 1 ]; then
  DEVICE=(--device cpu --dtype bf16 --repeats 1 --warmup 1 --compile-backend eager)
  COARSE=(--experts 8 --tokens 64 --d-model 16 --d-hidden 32 --top-k 2)
  COARSE_COMPILED=("${COARSE[@]}")
  FINE=(--experts 8 --tokens 64 --d-model 32 --d-hidden 16 --top-k 4)
  LM_SIZE=(benchmark.context_length=16 benchmark.max_bytes_per_domain=32768 model.d_model=16
    model.d_hidden=16 model.n_heads=1 model.n_blocks=2 "model.moe_blocks=[1]" model.n_experts=2
    trainer.accelerator=cpu trainer.precision=32-true trainer.eval_batch_size=64
    tracking.system_metrics=false)
  LM_FIRST=("grouped 32 false")
  LM_LATER=()
  CHECKS=(--dry)
else
  DEVICE=(--device cuda --dtype bf16 --repeats 10 --warmup 3)
  COARSE=(--experts 64 --tokens 32768 8192 --d-model 1024 --d-hidden 4096 --top-k 2)
  COARSE_COMPILED=(--experts 64 --tokens 32768 --d-model 1024 --d-hidden 4096 --top-k 2)
  FINE=(--experts 128 --tokens 32768 --d-model 2048 --d-hidden 768 --top-k 8)
  # 10-39 steps of batch 64 x 512 bytes per experience by domain (english and yaml are smaller
  # than the cap), 20 % of the documents held out (validation + test)
  LM_SIZE=(benchmark.max_bytes_per_domain=1456355)
  LM_FIRST=("grouped 64 false" "fused 64 false")
  LM_LATER=("grouped 128 false" "fused 128 false" "grouped 64 true" "fused 64 true")
  CHECKS=()
fi
BENCH_CASES=(--cases dense-active moe-grouped moe-fused frozen-step)
COMPILED_CASES=(--cases dense-active moe-grouped moe-fused)

bench() {  # bench NAME ARGS...: one lifelong-moe-bench dispatch report, appended to dispatch.jsonl
  local name=$1
  shift
  if [ $DRY = 1 ] && [[ $name == *fine* ]]; then  # the coarse steps run this same code path
    printf '{"step": "%s", "skipped": "dry run: same code path as the coarse shape"}\n' "$name" >>"$STEPS"
    return
  fi
  step "$name" "${BENCH_TIMEOUT:-150}" $(traced "$name") -m lifelong_moe.bench dispatch \
    "${DEVICE[@]}" "$@" --max-gib 40 --json "$WORK/$name.json"
  [ -f "$WORK/$name.json" ] &&
    "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); r['step']=sys.argv[2]; print(json.dumps(r))" \
      "$WORK/$name.json" "$name" >>"$OUT/dispatch.jsonl"
}

lm() {  # lm DISPATCH BATCH COMPILE: one lm_gpu run (2 experiences), its cost/* rows to lm_gpu.jsonl
  local dispatch=$1 batch=$2 compile=$3
  local name="lm-$dispatch-b$batch$([ "$compile" = true ] && echo -compiled)"
  local uri="sqlite:///$WORK/mlflow.db"
  step "$name" "${LM_TIMEOUT:-120}" $(traced "$name") -m lifelong_moe.cli experiment=lm_gpu \
    method=lifelong_moe "benchmark.domains=[english,python]" trainer.max_epochs=1 \
    trainer.batch_size="$batch" trainer.compile="$compile" model.dispatch="$dispatch" \
    trainer.checkpoint_every_n_steps=0 "${LM_SIZE[@]}" tracking.uri="$uri" \
    tracking.run_name="$name" tracking.log_checkpoints=false \
    trainer.checkpoint_dir="$WORK/checkpoints" hydra.run.dir="$WORK/hydra/$name"
  "$PY" experiments/gpu_lm_metrics.py "$uri" "$name" "$OUT/lm_gpu.jsonl" \
    --config dispatch="$dispatch" batch_size="$batch" compile="$compile" >>"$LOG" 2>&1
}

step preflight 60 $(traced preflight) experiments/gpu_preflight.py --json "$OUT/preflight.json"
step cuda-tests 150 $(traced cuda-tests) -m pytest -q -p no:cacheprovider -k cuda \
  tests/test_moe_fused.py tests/test_moe_dispatch.py tests/test_bench_loop.py \
  --junitxml="$OUT/cuda_tests.xml"
step gpu-checks 150 $(traced gpu-checks) experiments/gpu_checks.py "${CHECKS[@]}" \
  --json "$OUT/gpu_checks.json"
bench dispatch-e64-eager "${COARSE[@]}" "${BENCH_CASES[@]}"
bench dispatch-fine-eager "${FINE[@]}" "${BENCH_CASES[@]}"
bench dispatch-e64-compiled "${COARSE_COMPILED[@]}" --compile "${COMPILED_CASES[@]}"
for config in "${LM_FIRST[@]}"; do lm $config; done
bench dispatch-fine-compiled "${FINE[@]}" --compile "${COMPILED_CASES[@]}"
for config in "${LM_LATER[@]}"; do lm $config; done
"$PY" experiments/gpu_imports.py check "$TRACES"/*.json --json "$OUT/imports.json" >>"$LOG" 2>&1
echo "== [$SECONDS s] done: $OUT" | tee -a "$LOG" >&2
rm -rf "$WORK"
