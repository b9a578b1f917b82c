#!/usr/bin/env bash
# Run ON THE GPU MACHINE, after benchmarks/gpu_prepare.sh here, as one device call:
#   command: bash benchmarks/gpu_check.sh   carry: [".gpu"]   timeout_s: 480 (~7 min)
# GPU tests first, then the benchmarks docs/benchmarks.md asks for on a GPU; every report
# lands in $OUT. Each step is bounded, so one that hangs leaves time for the rest.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
MODEL=.gpu/model
BENCH="python3 -m cli.main bench --spawn --path $MODEL"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
  'import torch, transformers; print(torch.__version__, transformers.__version__)'; } \
  2>&1 | tee "$OUT/machine.txt"
timeout 120 python3 -m pytest -q -x tests/test_gpu.py tests/test_runtime.py 2>&1 \
  | tail -30 | tee "$OUT/tests.txt"
# Throughput at 64 in flight against the seed's loop and the batched loop, fp16 on the GPU.
timeout 75 $BENCH --workers 1 --duration 15 --baseline --baseline-seconds 10 \
  --json-file "$OUT/throughput-64.json" 2>&1 | tail -12
# Rotation under load, spawn vs forkserver on CUDA (GPU memory in the report).
for method in spawn forkserver; do
  ZEROPOOL_START_METHOD=$method timeout 70 $BENCH --workers 1 --duration 25 --rotate-at 8 \
    --rotate-to v2 --rotate-strategy surge --json-file "$OUT/rotation-$method.json" 2>&1 \
    | tail -16
done
# A short soak: GPU memory and RSS of the first and last tenth across rotations.
timeout 80 $BENCH --workers 1 --duration 60 --rotate-every 2 --json-file "$OUT/soak.json" \
  2>&1 | tail -10
ls -la "$OUT"
