#!/usr/bin/env bash
# The runs recorded in docs/benchmarks.md, in one go, side by side on one machine.
# Run from the repository root after `make setup`, with nothing else running.
set -euo pipefail
POOL=${POOL:-.venv/bin/pool}
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1

# Throughput at 64 in flight vs the seed's loop and an in-process batched loop (same threads).
$POOL bench --spawn --workers "$(nproc)" --duration 20 --baseline --baseline-seconds 20 \
  --json-file "$OUT/throughput.json"

# Latency before / during / after a rotation under load, both strategies.
for strategy in surge rolling; do
  $POOL bench --spawn --workers "$(nproc)" --duration 30 --rotate-at 8 --rotate-to v2 \
    --rotate-strategy "$strategy" --json-file "$OUT/rotation-$strategy.json" \
    --plot "$OUT/rotation-$strategy.png"
done
