#!/usr/bin/env bash
# One device call: benchmark (validated vs the references first) then the GPU tests.
# Usage on a GPU machine, from the repository root: bash benchmarks/run_deploy_gpu.sh OUT_DIR
set -o pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# pdquant_fast.kernels is kernels/ (setup.py package_dir); without an install, link it
python3 -c "import pdquant_fast.kernels" 2>/dev/null || ln -sfn ../kernels pdquant_fast/kernels
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
PDQUANT_BENCH_OUT="$out" timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_deploy_gpu.py \
    --sweep --max-s "${SECTION_MAX_S:-100}" 2>&1 | tee "$out/bench_deploy_gpu.log"
PDQUANT_TRITON_TUNE=0 timeout "${TEST_TIMEOUT:-190}" python3 -m pytest tests/test_deploy_gpu.py \
    -q -rs -p no:cacheprovider ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$out/test_deploy_gpu.log"
