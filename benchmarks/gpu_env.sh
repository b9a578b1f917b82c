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
