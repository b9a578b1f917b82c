#!/usr/bin/env bash
# Run ON THE GPU MACHINE, after benchmarks/gpu_prepare.sh here, as one device call:
#   command: bash benchmarks/gpu_check.sh   carry: [".gpu"]   timeout_s: 560 (about 470 s on an H200)
# GPU tests first, then the benchmarks docs/benchmarks.md asks for on a GPU (reports in $OUT:
# benchmarks/gpu_env.sh). Each step is bounded, so one that hangs leaves time for the rest.
source benchmarks/gpu_env.sh
# Four producer processes: this machine has 16 cores, and the load must not be the bottleneck.
BENCH="python3 -m cli.main bench --spawn --path $MODEL --producers 4"

step tests
# -v: a test that hangs is named (session 11: the step ran out of its 100 s after 3 tests).
timeout 150 python3 -m pytest -v -x -p no:cacheprovider --durations=8 tests/test_gpu.py tests/test_runtime.py \
  2>&1 | tail -30 | tee -a "$LOG"
# The router and producers alone on this machine (no model): the ceiling any model run meets.
step "echo: 1 worker, 256 in flight, 8 producers"
timeout 40 $BENCH --model echo --workers 1 --duration 10 --concurrency 256 --producers 8 \
  --json-file "$REPORTS/echo-256.json" 2>&1 | tail -8 | tee -a "$LOG"
# At 64 in flight against the seed's loop and the batched loop, fp16 on the GPU.
step "throughput: 1 worker, 1 pair/request, with baselines"
timeout 70 $BENCH --workers 1 --duration 12 --baseline --baseline-seconds 6 \
  --json-file "$REPORTS/tp-1w-1p.json" 2>&1 | tail -14 | tee -a "$LOG"
# Issue #15's GPU targets (benchmarks/gpu_env.sh), then the device's own limit on the same
# passes (pre-tokenised, no server).
throughput_runs 12 40 10
for batch in 32 64; do
  step "device only: $batch requests x 16 pairs per pass"
  timeout 35 python3 benchmarks/device_only.py --path $MODEL --pairs 16 --batch $batch \
    --seconds 8 2>&1 | grep -v Loading | tee -a "$LOG"
done
# Rotation under the 256-in-flight load (forkserver, the default), then a short soak: GPU
# memory and RSS of the first and last tenth across rotations.
step "rotation: 256 in flight, surge"
timeout 50 $BENCH --workers 1 --duration 18 --concurrency 256 --producers 8 --rotate-at 5 \
  --rotate-to v2 --rotate-strategy surge --json-file "$REPORTS/rot-256.json" 2>&1 \
  | tail -20 | tee -a "$LOG"
step "soak"
timeout 50 $BENCH --workers 1 --duration 30 --rotate-every 2 --json-file "$REPORTS/soak.json" \
  2>&1 | tail -12 | tee -a "$LOG"
# Issue #17's fleet p99 target where cores are not shared (tiny BERTs on the CPU: no GPU use).
# Each pool on 4 cores of its own, its passes on the last (as a Kubernetes pod with a cpuset).
step "fleet rotation: 3 CPU pools of the tiny BERT, 4 of the 16 cores each"
PIN=4 timeout 120 python3 benchmarks/fleet_rotation.py 3 5 3 2>&1 | grep -E "^round|median" \
  | tee -a "$LOG"
step done
ls -la "$OUT" | tee -a "$LOG"
