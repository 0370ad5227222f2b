#!/usr/bin/env bash
# Every GPU benchmark and test, for a session that has the GPU device: builds fastflow there (with the CUDA
# module) unless it is importable, then runs the steps named in FASTFLOW_GPU_STEPS (default "tests bench"):
#   memcheck  compute-sanitizer over the Triton kernels at their defaults, small sizes (bench/memcheck_gpu.py),
#          gpu_memcheck_<date>_<gpu>.json: a kernel that faults ends its process's CUDA context, so a new kernel
#          or launch setting is checked here before the timed steps meet it (FASTFLOW_GPU_MEMCHECK_CASES: some of its
#          cases, comma-separated, e.g. "coupling affine 8,coupling spline 8")
#   tests  the gpu- and triton-marked tests with Triton compiled for the GPU (pytest-xdist spreads the
#          compiles when installed; the slow sm_90 compile checks stay on CPU machines); the log, failures
#          first, in gpu_tests_<date>_<gpu>.txt
#   bench  the CUDA speed table one family at a time (FASTFLOW_GPU_FAMILIES, default "coupling ode"),
#          gpu_<family>_<date>_<gpu>.json, rewritten after every case
#   sweep  the Triton kernels' launch settings (bench/sweep_gpu.py, each sweep in its own process; FASTFLOW_GPU_SWEEPS
#          names some), gpu_sweep_<date>_<gpu>.json
#   profile  wall against kernel time and launches of the cases short of their targets (bench/profile_gpu.py),
#          gpu_profile_<date>_<gpu>.json
# Each step has its own time limit (FASTFLOW_GPU_MEMCHECK_TIMEOUT, FASTFLOW_GPU_TEST_TIMEOUT, FASTFLOW_GPU_BENCH_TIMEOUT per family,
# FASTFLOW_GPU_SWEEP_TIMEOUT, FASTFLOW_GPU_PROFILE_TIMEOUT). Seen on an H100 (2026-11-26): build ~30 s, tests 34-112 s
# with xdist, coupling family ~2 min (before its minibatch training cases: 64 steps of 256 rows each, about a minute
# more; rows are written as measured, so FASTFLOW_GPU_BENCH_TIMEOUT=420 keeps the affine rows at the end), ode
# family cut at 220 s before its last case (3x256 d=10) with 3 repeats of
# every row; the timed calls now stop after FASTFLOW_GPU_BUDGET seconds (default 3), about halving the slow ODE
# rows (estimate: ~300 s for the family; since then its 3xTF32 rows are gone and bf16 rows came: about as long); rows take up to FASTFLOW_GPU_REPEATS (default 10: one run's zuko rows varied
# up to 1.8x with 3) within that budget; tests and sweep 147 s before the sweep grew (~5 min now). A device call
# runs at most 600 s, so split the steps over calls: e.g. "tests bench profile" with FASTFLOW_GPU_FAMILIES=coupling,
# then "sweep", then the ode family. An H100 session (2026-11-26) took ~25 s per sanitized memcheck case.
# With 15 minutes of device time (a start takes minutes of it), one call of ~8 minutes is what fits: issue 5's open
# question first, e.g. FASTFLOW_GPU_STEPS="memcheck sweep" FASTFLOW_GPU_MEMCHECK_CASES="ode 256" FASTFLOW_GPU_SWEEPS=ode
# (the bf16 ODE kernel sanitized, then the ODE settings, ordered so that a cut sweep keeps the candidates), and in a
# later session "tests bench" with FASTFLOW_GPU_FAMILIES=ode, or the training sweep for issue 4.
# Usage: bash bench/run_gpu.sh [OUTPUT_DIR]   (default bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
python=${PYTHON:-python3}
steps=" ${FASTFLOW_GPU_STEPS:-tests bench} "
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
if [[ $steps == *" memcheck "* ]]; then
  cases=()
  IFS=, read -ra cases <<< "${FASTFLOW_GPU_MEMCHECK_CASES:-}"
  timeout "${FASTFLOW_GPU_MEMCHECK_TIMEOUT:-300}" $python bench/memcheck_gpu.py "$out/gpu_memcheck_$(date +%F)_${gpu}.json" \
    "${cases[@]}" || status=1
fi
if [[ $steps == *" tests "* ]]; then
  parallel=$($python -c 'import xdist' 2>/dev/null && echo "-n 8")
  log="$out/gpu_tests_$(date +%F)_${gpu}.txt"
  timeout "${FASTFLOW_GPU_TEST_TIMEOUT:-300}" $python -m pytest -m "(gpu or triton) and not slow" -p no:cacheprovider \
    $parallel --durations=10 -rfEs --tb=short > "$log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$log" | tail -n 40
fi
if [[ $steps == *" sweep "* ]]; then
  timeout "${FASTFLOW_GPU_SWEEP_TIMEOUT:-330}" $python bench/sweep_gpu.py "$out/gpu_sweep_$(date +%F)_${gpu}.json" \
    ${FASTFLOW_GPU_SWEEPS:-} || status=1
fi
if [[ $steps == *" profile "* ]]; then
  timeout "${FASTFLOW_GPU_PROFILE_TIMEOUT:-200}" $python bench/profile_gpu.py "$out/gpu_profile_$(date +%F)_${gpu}.json" || status=1
fi
if [[ $steps == *" bench "* ]]; then
  for family in ${FASTFLOW_GPU_FAMILIES:-coupling ode}; do
    timeout "${FASTFLOW_GPU_BENCH_TIMEOUT:-300}" $python -m fastflow.cli bench --device cuda --family "$family" \
      --repeats "${FASTFLOW_GPU_REPEATS:-10}" --budget "${FASTFLOW_GPU_BUDGET:-3}" --out "$out/gpu_${family}_$(date +%F)_${gpu}.json" || status=1
  done
fi
exit $status
