#!/usr/bin/env bash
# Every GPU benchmark and test in one call, for a session that has the GPU device: builds fastflow there
# (with the CUDA module) unless it is importable, writes the CUDA speed table one family at a time
# (gpu_<family>_<date>_<gpu>.json), then runs the gpu- and triton-marked tests with Triton compiled for
# the GPU (the slow sm_90 compile checks stay on CPU machines; pytest-xdist spreads the compiles when
# installed). FASTFLOW_GPU_SWEEP=1 adds the kernels' launch-setting sweep (bench/sweep_gpu.py) before the tests.
# Each step has its own time limit (FASTFLOW_GPU_BENCH_TIMEOUT per family, FASTFLOW_GPU_SWEEP_TIMEOUT,
# FASTFLOW_GPU_TEST_TIMEOUT). On an H200 (2026-11-26): build ~30 s, coupling family ~2 min, ode family > 190 s
# (give it 300), tests 25 s with xdist.
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
if [ "${FASTFLOW_GPU_SWEEP:-0}" = 1 ]; then  # launch settings of the Triton kernels (bench/sweep_gpu.py)
  timeout "${FASTFLOW_GPU_SWEEP_TIMEOUT:-240}" $python bench/sweep_gpu.py "$out/gpu_sweep_$(date +%F)_${gpu}.json" || status=1
fi
parallel=$($python -c 'import xdist' 2>/dev/null && echo "-n 8")
timeout "${FASTFLOW_GPU_TEST_TIMEOUT:-300}" $python -m pytest -v -m "(gpu or triton) and not slow" -p no:cacheprovider \
  $parallel --durations=10 || status=1
exit $status
