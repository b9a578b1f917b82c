#!/usr/bin/env bash
# The runs recorded in docs/benchmarks.md, in one go, side by side on one machine.
# Run from the repository root after `make setup`, with nothing else running.
# SOAK_SECONDS=0 skips the soak (the longest run).
set -euo pipefail
POOL=${POOL:-.venv/bin/pool}
OUT=${OUT:-bench-results}
SOAK_SECONDS=${SOAK_SECONDS:-600}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1

PYTHON=${PYTHON:-.venv/bin/python}

# What a forward pass costs and what least-cost pass planning buys; the ceiling of process
# parallelism on this machine (no router, no producers).
$PYTHON benchmarks/forward_cost.py --threads 1 --batch 64 | tee "$OUT/forward_cost.txt"
$PYTHON benchmarks/ceiling.py | tee "$OUT/ceiling.txt"
# Tokenising a batch: transformers' call against the Rust tokenizer called directly.
$PYTHON benchmarks/tokenize_cost.py | tee "$OUT/tokenize_cost.txt"

# Throughput at 64 in flight vs the seed's loop and an in-process batched loop (same threads).
$POOL bench --spawn --workers "$(nproc)" --duration 20 --baseline --baseline-seconds 20 \
  --json-file "$OUT/throughput.json"

# The router alone against libzmq's zmq.proxy (echo workers, no model).
$POOL bench --spawn --model echo --workers 2 --duration 10 --json-file "$OUT/echo.json"

# Latency before / during / after a rotation under load: both strategies, both ways of
# starting workers, loading at the serving priority or niced (interleaved, so drifts of the
# machine hit all alike).
for round in 1 2; do
  for method in spawn forkserver; do
    for nice in 0 10; do
      ZEROPOOL_START_METHOD=$method ZEROPOOL_LOAD_NICENESS=$nice $POOL bench --spawn \
        --workers "$(nproc)" --duration 30 --rotate-at 8 --rotate-to v2 \
        --rotate-strategy surge --json-file "$OUT/rotation-surge-$method-nice$nice-$round.json" \
        --plot "$OUT/rotation-surge-$method-nice$nice-$round.png"
    done
  done
done
$POOL bench --spawn --workers "$(nproc)" --duration 30 --rotate-at 8 --rotate-to v2 \
  --rotate-strategy rolling --json-file "$OUT/rotation-rolling.json" \
  --plot "$OUT/rotation-rolling.png"

# Soak: rotations back and forth under load, first vs last tenth.
if [ "$SOAK_SECONDS" -gt 0 ]; then
  $POOL bench --spawn --workers "$(nproc)" --duration "$SOAK_SECONDS" --rotate-every 2 \
    --json-file "$OUT/soak.json" --plot "$OUT/soak.png"
fi
