#!/usr/bin/env bash
# Every GPU test and benchmark in one call, for a session that has the GPU device: builds fastflow there
# (with the CUDA module) unless it is importable, runs the gpu- and triton-marked tests (Triton compiled
# for the GPU; the slow sm_90 compile checks stay on CPU machines), then the CUDA speed table.
# Usage: bash bench/run_gpu.sh [OUTPUT_DIR]   (default bench/results; logs and JSON land there)
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
timeout "${FASTFLOW_GPU_TEST_TIMEOUT:-200}" $python -m pytest -q -m "(gpu or triton) and not slow" -p no:cacheprovider \
  --junitxml="$out/gpu_tests.xml"
tests=$?
gpu=$($python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')
timeout "${FASTFLOW_GPU_BENCH_TIMEOUT:-330}" $python -m fastflow.cli bench --device cuda --repeats "${FASTFLOW_GPU_REPEATS:-3}" \
  ${FASTFLOW_GPU_FAMILIES:-} --out "$out/gpu_$(date +%F)_${gpu}.json"
bench=$?
echo "tests rc=$tests bench rc=$bench"
exit $(( tests || bench ))
