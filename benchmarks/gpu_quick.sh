#!/usr/bin/env bash
# Run ON THE GPU MACHINE when little device time is left (about 260 s): the CUDA graph tests,
# issue #15's throughput runs, a rotation under 256 in flight, and a py-spy profile of a pool
# at 256 in flight. After benchmarks/gpu_prepare.sh here (it brings py-spy's wheel too):
#   command: bash benchmarks/gpu_quick.sh   carry: [".gpu"]   timeout_s: 320
source benchmarks/gpu_env.sh
BENCH="python3 -m cli.main bench --spawn --path $MODEL"

step "tests: CUDA graphs"
timeout 70 python3 -m pytest -q -x -p no:cacheprovider --durations=5 tests/test_gpu.py \
  -k "cuda_graphs or new_shapes" 2>&1 | tail -15 | tee -a "$LOG"
throughput_runs 10 35 9
step "rotation: 256 in flight, surge"
timeout 40 $BENCH --workers 1 --duration 15 --concurrency 256 --producers 8 --rotate-at 4 \
  --rotate-to v2 --rotate-strategy surge --json-file "$REPORTS/rot-256.json" 2>&1 \
  | tail -14 | tee -a "$LOG"
step "profile: 1 worker, 1 pair/request, 256 in flight (py-spy, every process)"
timeout 40 /tmp/site/bin/py-spy record --subprocesses --nonblocking --idle -r 50 -f raw \
  -o "$OUT/profile.txt" -- $BENCH --workers 1 --duration 12 --concurrency 256 --producers 8 \
  2>&1 | tail -4 | tee -a "$LOG"
step done
