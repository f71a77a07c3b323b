#!/usr/bin/env bash
# One call on a lent GPU machine: GPU tests, then benches, logs and JSON under $OUT.
# Usage (from the repo root, on the device machine): bash bench/gpu_session.sh [tests] [bench] [e2e]
# Wheels for packages the image lacks (bitsandbytes, liger-kernel) are read from .whl/ if present.
set -u
OUT=${OUT:-/tmp/fastft-out}; L=/tmp/fastft-logs; rm -rf $L; mkdir -p "$OUT" $L
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 FASTFT_GPU_TESTS=1
n=0
t0=$(date +%s)
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - t0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -m fastft info; \
  python3 -c "import torch,triton,transformers,peft;print(torch.__version__,triton.__version__,transformers.__version__,peft.__version__)"; \
  python3 -m pip list 2>/dev/null | grep -iE 'bitsandbytes|liger|accelerate|datasets|trl'; } 2>&1 | tee $L/env.log
for s in "${@:-tests}"; do
  case $s in
    tests)
      timeout ${TESTS_TIMEOUT:-330} python3 -m pytest -q --timeout 120 -p no:cacheprovider -rfE \
        ${TESTS:-tests/test_gpu.py tests/test_lora_triton.py tests/test_nf4_triton.py tests/test_nf4_cuda.py tests/test_checkpointing.py} \
        2>&1 | tail -n 400 > $L/tests.log; tail -n 40 $L/tests.log;;
    bench)
      for b in ${BENCHES:-cross_entropy lora nf4 fused_ops checkpointing}; do
        l=$(left); [ "$l" -lt 40 ] && { echo "skip $b: ${l}s left"; continue; }
        echo "== bench_$b (${l}s left)"
        timeout $((l - 20)) python3 bench/bench_$b.py --device cuda ${BENCH_ARGS:-} > $L/bench_$b.log 2>&1
        echo "rc=$?"; tail -n 30 $L/bench_$b.log
      done
      cp bench/results/*cuda*.json $L/ 2>/dev/null;;
    *) n=$((n + 1)); l=$(left); echo "== $s (${l}s left)"
       timeout $((l - 15)) bash -c "$s" > $L/cmd_$n.log 2>&1; echo "rc=$?"; tail -n 60 $L/cmd_$n.log;;
  esac
done
tar czf "$OUT/logs.tgz" -C $L . && ls -la $L
