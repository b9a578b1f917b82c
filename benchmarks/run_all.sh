#!/usr/bin/env bash
# The runs recorded in docs/benchmarks.md, in one go, side by side on one machine.
# Run from the repository root after `make setup`, with nothing else running.
# SOAK_SECONDS=0 skips the soak (the longest run).
set -euo pipefail
POOL=${POOL:-.venv/bin/pool}
OUT=${OUT:-bench-results}
SOAK_SECONDS=${SOAK_SECONDS:-480}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1

# Throughput at 64 in flight vs the seed's loop and an in-process batched loop (same threads).
$POOL bench --spawn --workers "$(nproc)" --duration 20 --baseline --baseline-seconds 20 \
  --json-file "$OUT/throughput.json"

# The router alone against libzmq's zmq.proxy (echo workers, no model).
$POOL bench --spawn --model echo --workers 2 --duration 10 --json-file "$OUT/echo.json"

# Latency before / during / after a rotation under load: both strategies, and both ways of
# starting workers (interleaved, so drifts of the machine hit both alike).
for round in 1 2; do
  for method in spawn forkserver; do
    ZEROPOOL_START_METHOD=$method $POOL bench --spawn --workers "$(nproc)" --duration 30 \
      --rotate-at 8 --rotate-to v2 --rotate-strategy surge \
      --json-file "$OUT/rotation-surge-$method-$round.json" \
      --plot "$OUT/rotation-surge-$method-$round.png"
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
