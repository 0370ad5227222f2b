"""Rejection ABC on a two_moons-like simulator: fastflow's Numba path against a vectorized-numpy rejection with
the same chunking (and pyabc's rejection sampler where installed), in one run; draws/s, their ratio, the
bytes each simulation moves, the machine's copy bandwidth, and the peak memory of each path.

Both paths go through `fastflow.abc.rejection` with the same prior draws (torch, per chunk) and keep the best
10^3: the Numba path simulates with a parallel Numba kernel (counter-based RNG) and reduces with the parallel
Numba kernels; the numpy path simulates and reduces with vectorized numpy.

Run: `python -m pytest bench/bench_abc.py --benchmark-only -s`; sizes by FASTFLOW_BENCH_ABC_SIMS
(comma-separated, default 1000000,10000000), threads by NUMBA_NUM_THREADS.
"""

import importlib.util
import math
import os
import resource
import time
import tracemalloc

import numba
import numpy as np
import pytest
from numba import njit, prange

from fastflow.abc import rejection
from fastflow.priors import BoxUniform

SIZES = [int(n) for n in os.environ.get("FASTFLOW_BENCH_ABC_SIMS", "1000000,10000000").split(",")]
KEEP = 1_000
CHUNK = 1_000_000
PYABC_SIMS = 100_000
PRIOR = BoxUniform(-np.ones(2), np.ones(2))
X_OBS = np.array([0.0, 0.0])
_C = _S = math.sqrt(0.5)  # cos(π/4); the rotation by -π/4 has entries c, -s = c, c

# nominal bytes per simulation of one pass: prior θ float32 written (8) and converted to float64 (8 read, 16
# written), the simulator reading θ (16) and writing x (16), the distance reading x (16) and writing d (8),
# the compaction reading d (8)
BYTES_PER_SIMULATION = 8 + 8 + 16 + 16 + 16 + 16 + 8 + 8


@njit(inline="always")
def _uniform(seed, counter):
    """splitmix64 of (seed, counter) as a float64 in (0, 1)."""
    z = np.uint64(seed) + np.uint64(counter) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)) + np.uint64(1)) * (1.0 / 9007199254740994.0)


@njit(parallel=True, cache=True)
def _two_moons_kernel(theta, seed):
    n = theta.shape[0]
    x = np.empty((n, 2))
    for i in prange(n):
        a = math.pi * (_uniform(seed, 3 * i) - 0.5)
        r = 0.1 + 0.01 * math.sqrt(-2.0 * math.log(_uniform(seed, 3 * i + 1))) * math.cos(
            2.0 * math.pi * _uniform(seed, 3 * i + 2))
        z0 = _C * theta[i, 0] + _S * theta[i, 1]
        z1 = -_S * theta[i, 0] + _C * theta[i, 1]
        x[i, 0] = r * math.cos(a) + 0.25 - abs(z0)
        x[i, 1] = r * math.sin(a) + z1
    return x


def numba_two_moons(theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`(n, 2)` two_moons x for `(n, 2)` θ, simulated by the parallel Numba kernel."""
    return _two_moons_kernel(theta, rng.integers(2**63))


def numpy_two_moons(theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`(n, 2)` two_moons x for `(n, 2)` θ, vectorized numpy."""
    a = math.pi * (rng.random(theta.shape[0]) - 0.5)
    r = 0.1 + 0.01 * rng.standard_normal(theta.shape[0])
    z0 = _C * theta[:, 0] + _S * theta[:, 1]
    z1 = -_S * theta[:, 0] + _C * theta[:, 1]
    return np.stack((r * np.cos(a) + 0.25 - np.abs(z0), r * np.sin(a) + z1), axis=1)


PATHS = {"numba": (numba_two_moons, "numba"), "numpy": (numpy_two_moons, "numpy")}


def _run(path: str, n_sims: int):
    simulator, backend = PATHS[path]
    return rejection(simulator, PRIOR, X_OBS, n_sims, quantile=KEEP / n_sims, chunk_size=min(CHUNK, n_sims),
                     backend=backend)


def _timed(path: str, n_sims: int) -> tuple[float, float]:
    """Seconds of one run and its peak traced memory (numpy allocations) in MB."""
    tracemalloc.start()
    start = time.perf_counter()
    _run(path, n_sims)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak


def _copy_bandwidth() -> float:
    """GB/s of a 256 MB array copy (read + write counted), best of 5."""
    source, target = np.ones(32_000_000), np.empty(32_000_000)
    best = min(_seconds(lambda: np.copyto(target, source)) for _ in range(5))
    return 2 * source.nbytes / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _pyabc_draws_per_second() -> float:
    import pyabc

    def model(parameters):
        theta = np.array([parameters["t0"], parameters["t1"]])
        x = numpy_two_moons(theta[None], np.random.default_rng())[0]
        return {"x": x}

    prior = pyabc.Distribution(t0=pyabc.RV("uniform", -1, 2), t1=pyabc.RV("uniform", -1, 2))
    sampler = pyabc.sampler.SingleCoreSampler()
    abc = pyabc.ABCSMC(model, prior, lambda a, b: float(np.linalg.norm(a["x"] - b["x"])), population_size=KEEP,
                       sampler=sampler, eps=pyabc.ListEpsilon([0.05]))
    abc.new("sqlite://", {"x": X_OBS})
    start = time.perf_counter()
    history = abc.run(max_nr_populations=1, max_total_nr_simulations=PYABC_SIMS)
    return history.total_nr_simulations / (time.perf_counter() - start)


@pytest.mark.parametrize("n_sims", SIZES)
def test_rejection_numba_vs_numpy(benchmark, n_sims):
    for path in PATHS:  # JIT and caches outside the timings
        _run(path, 2 * CHUNK // 10)
    seconds, numba_peak = benchmark.pedantic(_timed, args=("numba", n_sims), rounds=1, iterations=1)
    numpy_seconds, numpy_peak = _timed("numpy", n_sims)
    bandwidth = _copy_bandwidth()
    rate, numpy_rate = n_sims / seconds, n_sims / numpy_seconds
    info = {
        "n_sims": n_sims, "keep": KEEP, "chunk": CHUNK, "threads": numba.get_num_threads(),
        "numba_seconds": seconds, "numpy_seconds": numpy_seconds, "numba_draws_per_s": rate,
        "numpy_draws_per_s": numpy_rate, "speedup": rate / numpy_rate, "bytes_per_simulation": BYTES_PER_SIMULATION,
        "numba_GB_per_s": rate * BYTES_PER_SIMULATION / 1e9, "copy_GB_per_s": bandwidth,
        "numba_peak_traced_MB": numba_peak, "numpy_peak_traced_MB": numpy_peak,
        "max_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
    }
    lines = [
        f"rejection, best {KEEP} of {n_sims:.0e}, chunk {CHUNK:.0e}, {numba.get_num_threads()} Numba threads",
        f"  numba: {seconds:6.2f} s  {rate:.3g} draws/s  peak {numba_peak:.0f} MB (numpy allocations)",
        f"  numpy: {numpy_seconds:6.2f} s  {numpy_rate:.3g} draws/s  peak {numpy_peak:.0f} MB",
        f"  speedup numba / numpy: {rate / numpy_rate:.2f}x",
        f"  ~{BYTES_PER_SIMULATION} B/simulation -> numba moves {rate * BYTES_PER_SIMULATION / 1e9:.1f} GB/s; "
        f"copy bandwidth {bandwidth:.1f} GB/s; process max RSS {info['max_rss_MB']:.0f} MB",
    ]
    if importlib.util.find_spec("pyabc") is not None:
        pyabc_rate = _pyabc_draws_per_second()
        info.update(pyabc_draws_per_s=pyabc_rate, speedup_vs_pyabc=rate / pyabc_rate)
        lines.append(f"  pyabc ({PYABC_SIMS:.0e} sims): {pyabc_rate:.3g} draws/s; numba / pyabc {rate / pyabc_rate:.0f}x")
    else:
        lines.append("  pyabc not installed: no pyabc column")
    benchmark.extra_info.update(info)
    print("\n" + "\n".join(lines))
