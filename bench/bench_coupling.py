"""Coupling flows (5 layers, width 128; splines with 8 bins, and affine): log_prob, sample, log_prob+backward
at batch 65,536 and dims 2/8/32 — fastflow on every backend available here against zuko's coupling spline flow
(NSF's transform on coupling masks) and RealNVP (affine) with the same architecture, as ratios measured in one run
(on CUDA against the faster of zuko's fp32 and TF32 runs). The cases come from `fastflow.benchmarks` (the same
table as `fastflow bench`); set FASTFLOW_BENCH_QUICK=1 for small sizes.

Run: `python -m pytest bench/bench_coupling.py --benchmark-only -s` (add the `bench` extra for zuko).
"""

import os

import pytest
import torch

from fastflow import benchmarks, set_num_threads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("FASTFLOW_BENCH_QUICK") == "1"
THREADS = int(os.environ.get("FASTFLOW_BENCH_THREADS", "1"))
set_num_threads(THREADS)
CASES = benchmarks.cases(DEVICE, quick=QUICK, families=["coupling"])


def synchronized(fn):
    """fn, then waiting for the device (as `benchmarks.time_call` does for the baseline)."""
    synchronize = benchmarks.synchronizer(DEVICE)

    def call():
        result = fn()
        synchronize()
        return result

    return call


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_coupling(benchmark, case):
    baseline, baseline_seconds = min(((name, benchmarks.time_call(case.implementations[name], device=DEVICE))
                                      for name in benchmarks.baseline_runs(case)), key=lambda pair: pair[1])
    fastest = min((name for name in case.implementations if name.startswith("fastflow")),
                  key=lambda name: benchmarks.time_call(case.implementations[name], device=DEVICE, repeats=3))
    benchmark.group = case.name
    benchmark.pedantic(synchronized(case.implementations[fastest]), rounds=5, warmup_rounds=1)
    ratio = baseline_seconds / benchmark.stats.stats.median
    benchmark.extra_info.update(implementation=fastest, baseline=baseline, baseline_seconds=baseline_seconds,
                                speedup=ratio, threads=THREADS, device=str(DEVICE))
    print(f"\n{case.name}: {fastest} {benchmark.stats.stats.median * 1e3:.1f} ms, {baseline} {baseline_seconds * 1e3:.1f} ms, "
          f"speedup {ratio:.2f}x")
