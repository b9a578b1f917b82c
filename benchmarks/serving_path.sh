#!/usr/bin/env bash
# Issue #15's CPU figures, side by side for one or more source trees, interleaved round by
# round so that a drift of the machine hits every tree alike. Each run starts its own
# `pool serve` with explicit flags (so a tree from before `pool bench --dtype/--threads`
# measures the same pool) and runs `pool bench` against it.
#
#   bash benchmarks/serving_path.sh [TREE...]      (default: this checkout)
#
# Per tree and round, one JSON line per figure:
#   tiny     a 2-layer BERT (compute negligible: the serving path), 1 worker at 1 thread,
#            64 in flight, one pair per request, against the in-process batched loop on
#            1 thread (`--baseline --threads 1`).
#   tiny-pinned  the same pool with `--cpu-affinity auto` (its passes on a core of their
#            own, the router and the intake on the other; trees that have the flag).
#   echo     the echo model against zmq.proxy, and the p50 at one request in flight.
#   minilm   the embedded MiniLM, 2 workers, 64 in flight, with --dtype float32 / auto, and
#            the seed's one-pair loop on the same two threads ("minilm-auto": auto only).
# ROUNDS (default 2) and BENCH_SECONDS (default 15) size the runs; FIGURES (default
# "tiny echo minilm") picks figures; nothing else may be running.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
ROUNDS=${ROUNDS:-2}
SECONDS_EACH=${BENCH_SECONDS:-15}
FIGURES=${FIGURES:-tiny echo minilm}
TREES=("$@")
[ ${#TREES[@]} -gt 0 ] || TREES=("$ROOT")
WORK=$(mktemp -d /tmp/zp-serving-XXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1

TINY=$WORK/tiny
PYTHONPATH=$ROOT $PY -c "from pathlib import Path; from tests.support import make_tiny_bert; \
make_tiny_bert(Path('$TINY'), seed=1)" 2>/dev/null
MINILM=$(PYTHONPATH=$ROOT $PY -c "from pool.builtin import embedded_model_path as p; print(p())")

# run TREE LABEL BENCH_ARGS -- SERVE_ARGS: one pool, one bench against it, one JSON line.
run() {
  local tree=$1 label=$2; shift 2
  local bench=() serve=()
  while [ "$1" != "--" ]; do bench+=("$1"); shift; done; shift
  serve=("$@")
  local dir; dir=$(mktemp -d "$WORK/pool-XXXX")
  (cd "$tree" && PYTHONPATH=$tree exec $PY -m cli.main serve --bind "ipc://$dir/fe" \
     --state-dir "$dir" "${serve[@]}") > "$dir/serve.log" 2>&1 &
  local pid=$!
  export ZEROPOOL_STATE_DIR=$dir ZEROPOOL_ENDPOINT=ipc://$dir/fe
  for _ in $(seq 120); do
    (cd "$tree" && PYTHONPATH=$tree $PY -m cli.main health --json) > /dev/null 2>&1 && break
    sleep 1
  done
  (cd "$tree" && PYTHONPATH=$tree $PY -m cli.main bench --duration "$SECONDS_EACH" \
     --json-file "$dir/bench.json" "${bench[@]}") > "$dir/bench.log" 2>&1 || tail -5 "$dir/bench.log" >&2
  kill -TERM $pid; wait $pid || true
  $PY - "$tree" "$label" "$dir/bench.json" <<'EOF'
import json, sys
tree, label, path = sys.argv[1:]
r = json.load(open(path))
out = {"tree": tree, "run": label, "pairs_per_s": r["pairs_per_s"],
       "p50_ms": round(r["latency_ms"]["p50"], 2), "p99_ms": round(r["latency_ms"]["p99"], 2),
       "errors": sum(r["errors"].values()), "lost": r["lost"]}
if "baseline" in r:
    b = r["baseline"]
    out |= {"batched": b["batched_pairs_per_s"], "seed": b["seed_pairs_per_s"],
            "vs_batched": b["pool_vs_batched"], "vs_seed": b["pool_vs_seed"]}
if "usage" in r:
    out["cpu"] = r["usage"]["cpu_percent"]
print(json.dumps(out), flush=True)
EOF
}

# The echo comparison needs `--spawn` (it starts zmq.proxy beside the pool).
echo_run() {
  local tree=$1
  (cd "$tree" && PYTHONPATH=$tree $PY -m cli.main bench --spawn --model echo --workers 1 \
     --duration "$SECONDS_EACH" --json) 2>/dev/null | $PY -c "
import json, sys
r = json.load(sys.stdin); e = r['echo']
print(json.dumps({'tree': '$tree', 'run': 'echo', 'requests_per_s': r['requests_per_s'],
                  'proxy': e['proxy_requests_per_s'], 'vs_proxy': e['pool_vs_proxy'],
                  'low_load_p50_ms': e['low_load_p50_ms']}), flush=True)"
}

for round in $(seq "$ROUNDS"); do
  for tree in "${TREES[@]}"; do
    if [[ " $FIGURES " == *" tiny "* ]]; then
      run "$tree" tiny --baseline --baseline-seconds "$SECONDS_EACH" --threads 1 -- \
        --path "$TINY" --workers 1 --threads 1 --dtype float32
    fi
    if [[ " $FIGURES " == *" tiny-pinned "* ]] && grep -q cpu_affinity "$tree/pool/config.py"
    then
      run "$tree" tiny-pinned --baseline --baseline-seconds "$SECONDS_EACH" --threads 1 -- \
        --path "$TINY" --workers 1 --threads 1 --dtype float32 --cpu-affinity auto
    fi
    if [[ " $FIGURES " == *" echo "* ]]; then echo_run "$tree"; fi
    if [[ " $FIGURES " == *" minilm "* ]]; then
      run "$tree" minilm-float32 -- --path "$MINILM" --workers 2 --dtype float32
    fi
    if [[ " $FIGURES " == *" minilm "* || " $FIGURES " == *" minilm-auto "* ]]; then
      run "$tree" minilm-auto --baseline --baseline-seconds "$SECONDS_EACH" --threads 2 -- \
        --path "$MINILM" --workers 2 --dtype auto
    fi
  done
done
