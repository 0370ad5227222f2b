#!/usr/bin/env bash
# Every GPU benchmark and test in one call, for a session that has the GPU device: builds fastflow there
# (with the CUDA module) unless it is importable, writes the CUDA speed table one family at a time
# (gpu_<family>_<date>_<gpu>.json), then runs the gpu- and triton-marked tests with Triton compiled for
# the GPU (the slow sm_90 compile checks stay on CPU machines; pytest-xdist spreads the compiles when
# installed). Each step has its own time limit (FASTFLOW_GPU_BENCH_TIMEOUT per family, FASTFLOW_GPU_TEST_TIMEOUT).
# Usage: bash bench/run_gpu.sh [OUTPUT_DIR]   (default bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
python=${PYTHON:-python3}
mkdir -p "$out"
nvidia-smi -L
$python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
if ! $python -c 'import fastflow._C' 2>/dev/null; then
  export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
  timeout 180 $python -m pip install -q --no-build-isolation --no-deps -e . -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
    || { echo "build failed"; exit 1; }
fi
$python -c 'from fastflow.backends import backends; [print(n, s.reason) for n, s in backends().items()]'
gpu=$($python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')
status=0
for family in ${FASTFLOW_GPU_FAMILIES:-coupling ode}; do
  timeout "${FASTFLOW_GPU_BENCH_TIMEOUT:-300}" $python -m fastflow.cli bench --device cuda --family "$family" \
    --repeats "${FASTFLOW_GPU_REPEATS:-3}" --out "$out/gpu_${family}_$(date +%F)_${gpu}.json" || status=1
done
parallel=$($python -c 'import xdist' 2>/dev/null && echo "-n 8")
timeout "${FASTFLOW_GPU_TEST_TIMEOUT:-300}" $python -m pytest -v -m "(gpu or triton) and not slow" -p no:cacheprovider \
  $parallel --durations=10 || status=1
exit $status
