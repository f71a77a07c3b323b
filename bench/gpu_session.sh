#!/usr/bin/env bash
# One call on a lent GPU machine: everything in priority order, logs and JSON written under $OUT
# as each stage ends, so a call stopped at its limit still returns the first results.
#
#   bash bench/gpu_session.sh                 # tests, e2e, the per-op benches, then e2e-compile (default plan)
#   bash bench/gpu_session.sh tests bench     # a subset of stages; any other word runs as a command
#
# Stages: tests (GPU tests), e2e (1B Llama LoRA/QLoRA step vs PEFT(+bitsandbytes) and Liger),
# bench (per-op benches, $BENCHES), e2e-compile (last, low priority: the 1B LoRA step with eager
# fastft, compiled fastft, compiled PEFT, Liger eager and compiled, once per torch.compile mode of
# $COMPILE_MODES, each its own JSON e2e-compile-<mode>-<device>.json). BUDGET (s, default 540) is the
# whole call's time; each stage starts only with enough left. Wheels the image lacks (bitsandbytes, liger-kernel) are read from
# .whl/ when present (see the device tool's README).
set -u
OUT=${OUT:-/tmp/fastft-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 FASTFT_GPU_TESTS=1
t0=$(date +%s)
left() { echo $(( ${BUDGET:-540} - ($(date +%s) - t0) )); }
# JSON written in this call (not the committed results of earlier runs), copied as each stage ends
save() { find bench/results -name '*cuda*.json' -newer "$OUT/env.log" -exec cp {} "$OUT"/ \; 2>/dev/null; true; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; git rev-parse HEAD 2>/dev/null; \
  python3 -m fastft info; \
  python3 -c "import torch,triton,transformers,peft;print(torch.__version__,triton.__version__,transformers.__version__,peft.__version__)"; \
  python3 -m pip list 2>/dev/null | grep -iE 'bitsandbytes|liger|accelerate|datasets|trl'; } > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

# per-op benches, most important first; "name:args" passes arguments to bench/bench_<name>.py
DEFAULT_BENCHES="cross_entropy:--head=frozen cross_entropy:--head=trainable lora nf4 moe dpo fused_ops checkpointing"
GPU_TESTS="tests/test_gpu.py tests/test_lora_triton.py tests/test_nf4_triton.py tests/test_nf4_cuda.py \
tests/test_nf4_once.py tests/test_experts.py tests/test_experts_nf4_triton.py tests/test_ledger.py tests/test_checkpointing.py"
n=0
COMPILE_MODES=${COMPILE_MODES:-"max-autotune-no-cudagraphs reduce-overhead"}
[ $# -eq 0 ] && set -- tests e2e bench e2e-compile
for stage in "$@"; do
    l=$(left)
    case $stage in
      tests)
        existing=$(for f in ${TESTS:-$GPU_TESTS}; do [ -f "$f" ] && echo "$f"; done)
        echo "== tests (${l}s left)"
        timeout $(( l < ${TESTS_TIMEOUT:-200} ? l - 10 : ${TESTS_TIMEOUT:-200} )) python3 -m pytest -q \
          -p no:cacheprovider -rfE $existing > "$OUT/tests.log" 2>&1
        echo "rc=$?"; tail -n 30 "$OUT/tests.log";;
      e2e)
        [ "$l" -lt 120 ] && { echo "skip e2e: ${l}s left"; continue; }
        echo "== bench_e2e (${l}s left)"
        timeout $(( l < ${E2E_TIMEOUT:-200} ? l - 20 : ${E2E_TIMEOUT:-200} )) python3 bench/bench_e2e.py \
          --device cuda --deadline-s $(( ${E2E_TIMEOUT:-200} - 30 )) ${E2E_ARGS:-} > "$OUT/bench_e2e.log" 2>&1
        echo "rc=$?"; tail -n 40 "$OUT/bench_e2e.log"; save;;
      e2e-compile)
        for cm in $COMPILE_MODES; do
          l=$(left); [ "$l" -lt 150 ] && { echo "skip e2e-compile $cm: ${l}s left"; continue; }
          echo "== bench_e2e --compile $cm (${l}s left)"
          to=$(( l - 20 < ${E2E_COMPILE_TIMEOUT:-240} ? l - 20 : ${E2E_COMPILE_TIMEOUT:-240} ))
          timeout $to python3 bench/bench_e2e.py --device cuda --modes lora --providers peft --compile "$cm" \
            --no-max-seq-search --deadline-s $(( to - 30 )) --out "e2e-compile-$cm" ${E2E_ARGS:-} \
            > "$OUT/bench_e2e_compile_$cm.log" 2>&1
          echo "rc=$?"; tail -n 40 "$OUT/bench_e2e_compile_$cm.log"; save
        done;;
      bench)
        for spec in ${BENCHES:-$DEFAULT_BENCHES}; do
          b=${spec%%:*}; a=""; [ "$spec" != "$b" ] && a=${spec#*:}; a=${a//=/ }
          l=$(left); [ "$l" -lt 40 ] && { echo "skip $spec: ${l}s left"; continue; }
          [ -f "bench/bench_$b.py" ] || { echo "skip $b: no bench/bench_$b.py"; continue; }
          n=$((n + 1)); echo "== bench_$b $a (${l}s left)"
          timeout $(( l - 20 < ${BENCH_TIMEOUT:-120} ? l - 20 : ${BENCH_TIMEOUT:-120} )) python3 "bench/bench_$b.py" \
            --device cuda $a ${BENCH_ARGS:-} > "$OUT/bench_${n}_$b.log" 2>&1
          echo "rc=$?"; tail -n 25 "$OUT/bench_${n}_$b.log"; save
        done;;
      *) n=$((n + 1)); echo "== $stage (${l}s left)"
         timeout $((l - 15)) bash -c "$stage" > "$OUT/cmd_$n.log" 2>&1; echo "rc=$?"; tail -n 60 "$OUT/cmd_$n.log";;
    esac
done
echo "done in $(( $(date +%s) - t0 ))s"; ls -la "$OUT"
