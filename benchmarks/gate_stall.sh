#!/usr/bin/env bash
# What a rotation's quality gate costs the traffic of the version serving during it
# (docs/benchmarks.md, session 18): a pool of the embedded MiniLM (2 workers), `pool bench`
# at 64 in flight for 32 s, a rotation to v2 (the same model) 5 s in, with the gate and without,
# ROUNDS times, interleaved. One line per run: the bench's before / during / after phases as
# p50 / p99 / slowest ms, and the rotation's phase timings.
#
#   bash benchmarks/gate_stall.sh          (nothing else running; ~50 s a run)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
ROUNDS=${ROUNDS:-2}
export HF_HUB_OFFLINE=1

# run LABEL [versions-add args]
run() {
  local label=$1; shift
  local dir; dir=$(mktemp -d /tmp/zp-gate-XXXX)
  export ZEROPOOL_STATE_DIR=$dir ZEROPOOL_ENDPOINT=ipc://$dir/fe
  (cd "$ROOT" && exec $PY -m cli.main serve --bind "ipc://$dir/fe" --state-dir "$dir" \
     --path builtin:minilm --workers 2) > "$dir/serve.log" 2>&1 &
  local pid=$!
  for _ in $(seq 120); do
    (cd "$ROOT" && $PY -m cli.main health --json) > /dev/null 2>&1 && break
    sleep 1
  done
  (cd "$ROOT" && $PY -m cli.main versions add v2 --path builtin:minilm "$@") > /dev/null
  (cd "$ROOT" && $PY -m cli.main bench --duration 32 --concurrency 64 --rotate-at 5 \
     --rotate-to v2 --json-file "$dir/bench.json") > "$dir/bench.log" 2>&1
  kill -TERM $pid; wait $pid || true
  $PY - "$dir/bench.json" "$label" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
rotation = report["rotation"]
def ms(value):
    return None if value is None else round(value)
phases = {name: [ms(phase["latency_ms"][k]) for k in ("p50", "p99", "max")]
          for name, phase in rotation["phases"].items()}
print(json.dumps({"run": sys.argv[2], "pairs_per_s": round(report["pairs_per_s"]),
                  "phases_p50_p99_max_ms": phases,
                  "timings_s": rotation["record"]["timings"],
                  "quality": rotation["record"].get("quality")}), flush=True)
PY
  rm -rf "$dir"
}

for _ in $(seq "$ROUNDS"); do
  run gate --eval builtin:zh-pairs
  run no-gate
done
