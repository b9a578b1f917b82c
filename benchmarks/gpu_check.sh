#!/usr/bin/env bash
# Run ON THE GPU MACHINE, after benchmarks/gpu_prepare.sh here, as one device call:
#   command: bash benchmarks/gpu_check.sh   carry: [".gpu"]   timeout_s: 540 (342 s on an H200 before the issue-15 steps, ~+100 s with them)
# GPU tests first, then the benchmarks docs/benchmarks.md asks for on a GPU; every report
# lands in $OUT (log.txt, gpu-util.csv and the JSON reports). Each step
# is bounded, so one that hangs leaves time for the rest.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
if ! python3 -c 'import zmq, orjson' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
MODEL=.gpu/model
# Four producer processes: this machine has 16 cores, and the load must not be the bottleneck.
BENCH="python3 -m cli.main bench --spawn --path $MODEL --producers 4"
step() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; python3 -c \
  'import torch, transformers; print(torch.__version__, transformers.__version__)'; } \
  2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 \
  > "$OUT/gpu-util.csv" 2>&1 &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT

step tests
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_runtime.py \
  2>&1 | tail -30 | tee -a "$LOG"
step "new shapes: cuDNN attention on vs off"
timeout 60 python3 benchmarks/new_shapes.py --path $MODEL 2>&1 | grep -v Loading | tee -a "$LOG"
# Throughput at 64 in flight against the seed's loop and the batched loop, fp16 on the GPU.
step "throughput: 1 worker, 1 pair/request, with baselines"
timeout 80 $BENCH --workers 1 --duration 15 --baseline --baseline-seconds 10 \
  --json-file "$OUT/tp-1w-1p.json" 2>&1 | tail -14 | tee -a "$LOG"
# One pair per request makes the router carry a message per pair; 16 pairs per request shows
# the GPU side alone. Two workers on one GPU overlap one's tokenizing with the other's pass.
step "throughput: 1 worker, 16 pairs/request"
timeout 45 $BENCH --workers 1 --duration 15 --pairs-per-request 16 \
  --json-file "$OUT/tp-1w-16p.json" 2>&1 | tail -12 | tee -a "$LOG"
# Issue #15's GPU targets: 256 in flight at one pair per request; the device's own limit at
# 16 pairs per request (pre-tokenised, no server); the traced graph against eager on CUDA.
step "throughput: 1 worker, 1 pair/request, 256 in flight"
timeout 45 $BENCH --workers 1 --duration 15 --concurrency 256 \
  --json-file "$OUT/tp-1w-1p-256.json" 2>&1 | tail -12 | tee -a "$LOG"
step "device only: 64 requests x 16 pairs per pass"
timeout 40 python3 benchmarks/device_only.py --path $MODEL --pairs 16 --batch 64 \
  --seconds 10 2>&1 | grep -v Loading | tee -a "$LOG"
step "throughput: 1 worker, 16 pairs/request, --graph traced"
timeout 45 $BENCH --workers 1 --duration 15 --pairs-per-request 16 --graph traced \
  --json-file "$OUT/tp-1w-16p-traced.json" 2>&1 | tail -12 | tee -a "$LOG"
step "throughput: 2 workers, 1 pair/request"
timeout 45 $BENCH --workers 2 --duration 15 --json-file "$OUT/tp-2w-1p.json" 2>&1 \
  | tail -12 | tee -a "$LOG"
# Rotation under load, spawn vs forkserver on CUDA (GPU memory in the report).
for method in spawn forkserver; do
  step "rotation: $method"
  ZEROPOOL_START_METHOD=$method timeout 60 $BENCH --workers 1 --duration 20 --rotate-at 6 \
    --rotate-to v2 --rotate-strategy surge --json-file "$OUT/rot-$method.json" 2>&1 \
    | tail -20 | tee -a "$LOG"
done
# A short soak: GPU memory and RSS of the first and last tenth across rotations.
step "soak"
timeout 75 $BENCH --workers 1 --duration 50 --rotate-every 2 --json-file "$OUT/soak.json" \
  2>&1 | tail -12 | tee -a "$LOG"
step done
ls -la "$OUT" | tee -a "$LOG"
