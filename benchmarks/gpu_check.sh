#!/usr/bin/env bash
# The one script a lent H100/H200 runs: build with CUDA, GPU tests, kernel benchmarks, one
# reconstruction-step timing, packed GPU kernels. Usage: bash benchmarks/gpu_check.sh [OUT_DIR]
# (default benchmarks/results/gpu). Everything lands in OUT_DIR as at most 8 small files:
#   gpu_check.log (all output), env.txt (nvidia-smi, versions, pdquant info), pytest_gpu.txt,
#   calib_kernels_gpu.jsonl, calib_step.jsonl, deploy_gpu.jsonl.
# Each stage has its own time limit and a failed stage does not stop the next one; the exit code
# is the number of failed stages. Budget: well under 10 minutes on an H100 (build ~1-2 min).
set -u -o pipefail
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PDQUANT_BENCH_OUT="$OUT"
LOG="$OUT/gpu_check.log"
FAILED=0
stage() {  # stage NAME SECONDS CMD...: run with a time limit, log, count failures
  local name=$1 limit=$2
  shift 2
  echo "=== [$(date +%T)] $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== [$(date +%T)] $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
}
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name())"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
stage build 300 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
$PY -m pdquant_fast.info >> "$OUT/env.txt" 2>&1
stage gpu-tests 180 $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/ \
  --junitxml="$OUT/pytest_gpu.xml" -o junit_family=xunit2
[ -f "$OUT/pytest_gpu.xml" ] && mv "$OUT/pytest_gpu.xml" "$OUT/pytest_gpu.txt"
for bench in bench_calib_kernels_gpu bench_deploy_gpu; do
  if [ -f "benchmarks/$bench.py" ]; then
    stage "$bench" 180 $PY "benchmarks/$bench.py" --out "$OUT"
  else
    echo "=== $bench: benchmarks/$bench.py not present, skipped" | tee -a "$LOG"
  fi
done
stage calib-step 120 $PY benchmarks/bench_calib_step.py --device cuda --iters 30 --out "$OUT"
echo "=== failed stages: $FAILED" | tee -a "$LOG"
exit "$FAILED"
