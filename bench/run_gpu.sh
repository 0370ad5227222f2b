#!/usr/bin/env bash
# Every GPU test and benchmark in one call, for a session that has the GPU device: the gpu-marked
# tests, then the speed table for CUDA written to bench/results/<date>-<gpu>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -m gpu
mkdir -p bench/results
gpu=$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')
fastflow bench --device cuda --out "bench/results/$(date +%F)-${gpu}.json"
