# Sourced by benchmarks/gpu_check.sh and gpu_quick.sh on the GPU machine: the wheels its image
# lacks (from .gpu/whl, made by gpu_prepare.sh), the environment, `step` and the GPU monitor.
# Every report lands in $OUT: log.txt, gpu-util.csv and reports.tar (a call brings back at
# most 8 files, so the JSON reports travel in one tar, refreshed at each step).
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 COLUMNS=110
MODEL=.gpu/model
REPORTS=/tmp/zeropool-reports
mkdir -p "$REPORTS"
step() {
  tar -cf "$OUT/reports.tar" -C "$REPORTS" .
  echo "=== $* ($(date +%T))" | tee -a "$LOG"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; python3 -c \
  'import torch, transformers; print(torch.__version__, transformers.__version__)'; } \
  2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 \
  > "$OUT/gpu-util.csv" 2>&1 &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT

# Issue #15's GPU throughput runs: 1, 2 and 4 workers at one pair per request and 256 in
# flight (session 11: 6.6k / 12.6k pairs/s, the GPU 6-18% busy, each worker bound by its own
# CPU work: do 4 share the GPU as well?), then 1 and 2 at 16 pairs per request and 64 in
# flight. $1: seconds a run, $2: its time limit, $3: lines of each report kept.
throughput_runs() {
  local seconds=$1 limit=$2 lines=$3 workers
  for workers in 1 2 4; do
    step "throughput: $workers worker(s), 1 pair/request, 256 in flight, 8 producers"
    timeout "$limit" $BENCH --workers $workers --duration "$seconds" --concurrency 256 \
      --producers 8 --json-file "$REPORTS/tp-${workers}w-1p-256.json" 2>&1 | tail -"$lines" \
      | tee -a "$LOG"
  done
  # The same 1-worker run with every pass up to --max-batch (session 13's pipelined passes,
  # the default, measured on CPU only: on a GPU they cut 256 into two passes of 128).
  step "throughput: 1 worker, 1 pair/request, 256 in flight, --passes full"
  ZEROPOOL_PASSES=full timeout "$limit" $BENCH --workers 1 --duration "$seconds" \
    --concurrency 256 --producers 8 --json-file "$REPORTS/tp-1w-1p-256-full.json" 2>&1 \
    | tail -"$lines" | tee -a "$LOG"
  for workers in 1 2; do
    step "throughput: $workers worker(s), 16 pairs/request, 64 in flight"
    timeout "$limit" $BENCH --workers $workers --duration "$seconds" --pairs-per-request 16 \
      --producers 4 --json-file "$REPORTS/tp-${workers}w-16p.json" 2>&1 | tail -"$lines" \
      | tee -a "$LOG"
  done
}
