"""NPE on two_moons at 10^4 simulations: fastflow against sbi's NPE(density_estimator="nsf") on the
same simulations, the same thread count and budget, each with its package's defaults (not one architecture:
fastflow's 4 spline couplings of width 128 on a mixture base, batch 512; sbi's NSF of 5 transforms of width 50,
batch 200), so the speedup is of the two products, read beside their C2ST; wall time (simulate + train + sample) and
C2ST against the package's reference over observations 1..FASTFLOW_BENCH_OBSERVATIONS (default 5).

Run: `python -m pytest bench/bench_npe.py --benchmark-only -s`; the sbi side needs the `bench` extra.
"""

import importlib.util
import os
import time

import numpy as np
import torch

from fastflow import set_num_threads
from fastflow.inference import simulate
from fastflow.inference.methods import train_npe
from fastflow.metrics import c2st
from fastflow.tasks import get_task

NUM_SIMULATIONS = 10_000
NUM_SAMPLES = 10_000
THREADS = int(os.environ.get("FASTFLOW_BENCH_THREADS", "1"))
OBSERVATIONS = range(1, int(os.environ.get("FASTFLOW_BENCH_OBSERVATIONS", "5")) + 1)


def _scores(task, samples: dict[int, torch.Tensor]) -> list[float]:
    """C2ST of each observation's samples against the task's reference posterior."""
    return [c2st(task.reference_posterior_samples(task.observation(i), NUM_SAMPLES, seed=0), samples[i]) for i in OBSERVATIONS]


def _fastflow(task):
    start = time.perf_counter()
    posterior = train_npe(task, num_simulations=NUM_SIMULATIONS, seed=0, progress=False)
    samples = {i: posterior.sample(NUM_SAMPLES, task.observation(i)) for i in OBSERVATIONS}
    return time.perf_counter() - start, samples


def _sbi(task):
    from sbi.inference import NPE as SbiNPE
    from sbi.utils import BoxUniform as SbiBoxUniform

    start = time.perf_counter()
    sims = simulate(task.simulate, task.prior, NUM_SIMULATIONS, seed=0)
    inference = SbiNPE(prior=SbiBoxUniform(task.prior.low, task.prior.high), density_estimator="nsf", show_progress_bars=False)
    estimator = inference.append_simulations(sims.theta, sims.x).train()
    posterior = inference.build_posterior(estimator)
    samples = {i: posterior.sample((NUM_SAMPLES,), x=task.observation(i), show_progress_bars=False) for i in OBSERVATIONS}
    return time.perf_counter() - start, samples


def test_npe_two_moons(benchmark):
    set_num_threads(THREADS)  # torch's and the native kernels' OpenMP threads alike
    task = get_task("two_moons")
    seconds, samples = benchmark.pedantic(_fastflow, args=(task,), rounds=1, iterations=1)
    scores = _scores(task, samples)
    info = {"threads": THREADS, "fastflow_seconds": seconds, "fastflow_c2st": scores, "fastflow_mean_c2st": float(np.mean(scores))}
    lines = [f"fastflow NPE: {seconds:6.1f} s, C2ST {np.mean(scores):.3f}  ({', '.join(f'{s:.3f}' for s in scores)})"]
    if importlib.util.find_spec("sbi") is not None:
        sbi_seconds, sbi_samples = _sbi(task)
        sbi_scores = _scores(task, sbi_samples)
        info.update(sbi_seconds=sbi_seconds, sbi_c2st=sbi_scores, sbi_mean_c2st=float(np.mean(sbi_scores)), speedup=sbi_seconds / seconds)
        lines.append(f"sbi NPE(nsf):  {sbi_seconds:6.1f} s, C2ST {np.mean(sbi_scores):.3f}  ({', '.join(f'{s:.3f}' for s in sbi_scores)})")
        lines.append(f"speedup at each package's defaults (sbi time / fastflow time): {sbi_seconds / seconds:.2f}x")
    else:
        lines.append("sbi not installed (pip install -e '.[bench]'): no side-by-side run")
    benchmark.extra_info.update(info)
    print("\n" + "\n".join(lines))
