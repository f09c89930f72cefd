#!/usr/bin/env bash
# The one script a lent H100/H200 runs: build with CUDA, GPU tests, kernel benchmarks, one
# reconstruction-step timing, packed GPU kernels, whole packed-model latency. Usage:
# bash benchmarks/gpu_check.sh [OUT_DIR] (default benchmarks/results/gpu). Everything lands in
# OUT_DIR as at most 8 small files:
#   gpu_check.log (all output), env.txt (nvidia-smi, versions, pdquant info), pytest_gpu.txt,
#   calib_step.jsonl, calibration.jsonl, packed_latency.jsonl, deploy_gpu.jsonl,
#   calib_kernels_gpu.jsonl.
# Each stage has its own time limit and a failed stage does not stop the next one; the exit code
# is the number of failed stages. Budget: 580 s with every stage at its limit (the packed-latency
# stage runs once per layout), typically far less (per-stage limits below, overridable: BUILD_S,
# GPU_TESTS_S, STEP_BENCH_S, CALIB_RUN_S, LATENCY_S, DEPLOY_BENCH_S, CALIB_BENCH_S); a failed CUDA
# build adds a 120 s build without it. Stages run in order of importance, so a run cut short
# keeps the most useful results. STAGES="build gpu-tests ..." runs only the stages named (a rerun after a
# fix); GPU_TEST_PATHS narrows the tests, DEPLOY_SECTIONS the deploy benchmark. The GPU engine
# test and the whole-calibration stage need the shared data: point PDQUANT_SHARED_DATA at a
# carried copy. Pass PDQUANT_GIT_SHA=<the commit sent> too: the copy's git metadata can be
# stale, and every row records the SHA. tests/test_gpu_check_script.py checks on any machine
# that every command and flag used here exists.
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
  if [ -n "${STAGES:-}" ] && [[ " $STAGES " != *" $name "* ]]; then
    echo "=== $name: not in STAGES, skipped" | tee -a "$LOG"
    return
  fi
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
stage build ${BUILD_S:-130} $PY -m pip install --no-build-isolation --no-deps --no-index -e .
if [ "$FAILED" -gt 0 ]; then  # the Triton kernels and the references still run without CUDA
  PDQUANT_BUILD_CUDA=0 stage build-without-cuda 120 $PY -m pip install --no-build-isolation \
    --no-deps --no-index -e .
fi
timeout 30 $PY -m pdquant_fast.info >> "$OUT/env.txt" 2>&1
# GPU tests: the kernels' one-off config timing is off here (PDQUANT_TRITON_TUNE=0) to save time;
# spread over worker processes where pytest-xdist is installed (the Triton compiles are CPU-bound)
# (-v: with workers, a line per test as it ends, so a run cut off by its limit still says which
# passed); a per-test limit where pytest-timeout is installed, so one hang cannot eat the stage
XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_TEST_WORKERS:-12}")
$PY -c "import pytest_timeout" 2>/dev/null && XDIST+=(--timeout "${GPU_TEST_TIMEOUT:-60}")
PDQUANT_TRITON_TUNE=0 stage gpu-tests ${GPU_TESTS_S:-120} $PY -m pytest -m gpu -v -rfEs \
  --tb=short --durations=15 "${XDIST[@]}" -p no:cacheprovider ${GPU_TEST_PATHS:-tests/} \
  --maxfail=25 --junitxml="$OUT/pytest_gpu.txt" -o junit_family=xunit2
stage calib-step ${STEP_BENCH_S:-40} $PY benchmarks/bench_calib_step.py --device cuda --iters 30 \
  --out "$OUT"
# a whole calibration (ResNet-20 W2A4 PD-Quant, real weights and images: needs the shared data)
stage calibration ${CALIB_RUN_S:-90} $PY benchmarks/bench_calibration.py --device cuda \
  --data "${PDQUANT_SHARED_DATA:-../shared/data}" --iters 100 \
  --backends reference,auto,auto+graph,triton \
  --out "$OUT"
# both activation layouts: the conv benchmark's NCHW input costs a layout conversion per call
for MF in contiguous channels_last; do
  stage packed-latency ${LATENCY_S:-40} $PY benchmarks/bench_packed_latency.py --device cuda \
    --models cifar_resnet20 --formats w4a4 --batch 1 32 256 --repeat 5 --memory-format "$MF" \
    --out "$OUT"
done
stage deploy-kernels ${DEPLOY_BENCH_S:-50} $PY benchmarks/bench_deploy_gpu.py --sweep \
  --sections "${DEPLOY_SECTIONS:-wa16,qmm,conv}" --max-s "${SECTION_MAX_S:-45}" --out "$OUT"
stage calib-kernels ${CALIB_BENCH_S:-40} $PY benchmarks/bench_calib_kernels_gpu.py --out "$OUT"
echo "=== failed stages: $FAILED" | tee -a "$LOG"
exit "$FAILED"
