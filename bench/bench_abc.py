"""Rejection ABC speed on two_moons: the fused Numba kernel against the general path with a Numba simulator,
a vectorized-numpy rejection (same chunking) and pyabc's rejection, in one run; draws/s, their ratios, the
bytes each simulation moves, the machine's copy bandwidth, and the peak memory of each path.

Paths, each through `fastflow.abc.rejection`, keeping the best 10^3 of n_sims (x_obs = 0, MAD scaling):
- fused: the two_moons task; one parallel Numba kernel per chunk draws θ, simulates, measures the distance
  and keeps a streaming top-k (counter-based RNG), nothing of chunk size materialized (its default chunks of
  10^7, `FUSED_CHUNK_SIZE`; the general paths use chunks of 10^6);
- numba: the general path: torch prior draws per chunk, a parallel Numba simulator, the Numba reduction;
- numpy: the general path with a vectorized numpy simulator and the numpy reduction;
- pyabc (where installed): `ABCSMC` run for one generation, which is rejection ABC from the prior: population
  10^3 with the fixed tolerance that accepts 1% (found by a fastflow run), so ~10^5 draws, the model called per
  particle (pyabc has no batched models), the single-core sampler and an in-memory history database.
Peak memory is the process's peak RSS growth during a run (/proc/self/clear_refs resets the peak), which
counts Numba's allocations too; it excludes the ~0.5 GB that importing torch and Numba costs.

Run: `python -m pytest bench/bench_abc.py --benchmark-only -s` (or `python bench/bench_abc.py`); sizes by
FASTFLOW_BENCH_ABC_SIMS (comma-separated, default 1000000,10000000,100000000), pyabc draws by
FASTFLOW_BENCH_ABC_PYABC_SIMS (default 100000, 0 skips it), threads by NUMBA_NUM_THREADS (2 for the issue's
targets). Writes `bench/results/abc_speed_<date>_cpu.json`. The machine may be shared: each row records the
load average, and a load above the thread count means the timings are throttled.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path

import numba
import numpy as np
import pytest
from numba import njit, prange

from fastflow.abc import rejection
from fastflow.abc.rejection import FUSED_CHUNK_SIZE
from fastflow.priors import BoxUniform
from fastflow.tasks import get_task
from fastflow.tasks.numba_simulator import normal, uniform

SIZES = [int(float(n)) for n in os.environ.get("FASTFLOW_BENCH_ABC_SIMS", "1000000,10000000,100000000").split(",")]
PYABC_SIMS = int(float(os.environ.get("FASTFLOW_BENCH_ABC_PYABC_SIMS", "100000")))
PYABC_POPULATION = 1_000
KEEP = 1_000
CHUNK = 1_000_000
TASK = get_task("two_moons")
PRIOR = BoxUniform(-np.ones(2), np.ones(2))
X_OBS = np.array([0.0, 0.0])
RESULTS = Path(__file__).parent / "results"
_C = _S = math.sqrt(0.5)  # cos(π/4); the rotation by -π/4 has entries c, -s = c, c

# nominal bytes per simulation of the general path: prior θ float32 written (8) and converted to float64 (8 read,
# 16 written), the simulator reading θ (16) and writing x (16), the distance reading x (16) and writing d (8),
# the compaction reading d (8). The fused kernel keeps a simulation in registers: ~0 bytes.
BYTES_PER_SIMULATION = 8 + 8 + 16 + 16 + 16 + 16 + 8 + 8


@njit(parallel=True, cache=True)
def _two_moons_kernel(theta, seed):
    n = theta.shape[0]
    x = np.empty((n, 2))
    for i in prange(n):
        a = math.pi * (uniform(seed, 3 * i) - 0.5)
        r = 0.1 + 0.01 * normal(seed, 3 * i + 1)
        z0 = _C * theta[i, 0] + _S * theta[i, 1]
        z1 = -_S * theta[i, 0] + _C * theta[i, 1]
        x[i, 0] = r * math.cos(a) + 0.25 - abs(z0)
        x[i, 1] = r * math.sin(a) + z1
    return x


def numba_two_moons(theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`(n, 2)` two_moons x for `(n, 2)` θ, simulated by a parallel Numba kernel."""
    return _two_moons_kernel(theta, rng.integers(2**62))


def numpy_two_moons(theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`(n, 2)` two_moons x for `(n, 2)` θ, vectorized numpy."""
    a = math.pi * (rng.random(theta.shape[0]) - 0.5)
    r = 0.1 + 0.01 * rng.standard_normal(theta.shape[0])
    z0 = _C * theta[:, 0] + _S * theta[:, 1]
    z1 = -_S * theta[:, 0] + _C * theta[:, 1]
    return np.stack((r * np.cos(a) + 0.25 - np.abs(z0), r * np.sin(a) + z1), axis=1)


PATHS = {
    "fused": dict(simulator=TASK, prior=TASK.prior, backend="numba"),
    "numba": dict(simulator=numba_two_moons, prior=PRIOR, backend="numba"),
    "numpy": dict(simulator=numpy_two_moons, prior=PRIOR, backend="numpy"),
}


def _run(path: str, n_sims: int, **kwargs):
    arguments = dict(PATHS[path])
    chunk_size = None if path == "fused" else min(CHUNK, n_sims)
    result = rejection(arguments.pop("simulator"), arguments.pop("prior"), X_OBS, n_sims, quantile=KEEP / n_sims,
                       chunk_size=chunk_size, **arguments, **kwargs)
    assert result.fused == (path == "fused")
    return result


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e3
    return math.nan


def _timed(path: str, n_sims: int) -> tuple[float, float]:
    """Seconds of one run and its peak RSS growth in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        pass
    before = _rss_mb("VmRSS")
    start = time.perf_counter()
    _run(path, n_sims)
    seconds = time.perf_counter() - start
    return seconds, _rss_mb("VmHWM") - before


def _copy_bandwidth() -> float:
    """GB/s of a 256 MB array copy (read + write counted), best of 5."""
    source, target = np.ones(32_000_000), np.empty(32_000_000)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best / 1e9


def pyabc_population(n_sims: int = PYABC_SIMS) -> int:
    """pyabc's population: n_sims / 100 draws accepted, between 10 and PYABC_POPULATION."""
    return max(10, min(PYABC_POPULATION, n_sims // 100))


def pyabc_draws_per_second(n_sims: int = PYABC_SIMS) -> tuple[float, int]:
    """pyabc's rejection (one ABCSMC generation from the prior) on the same model: draws/s and draws made."""
    import pyabc

    for name in ("ABC", "Epsilon", "Distance", "Acceptor", "Sampler", "History", "Population", "Transition"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # the unscaled distance that accepts n_sims / population of the prior's simulations
    population = pyabc_population(n_sims)
    eps = rejection(TASK, TASK.prior, X_OBS, 10**6, quantile=population / n_sims, scale=None).tolerance

    def model(parameters):
        theta = np.array([[parameters["t0"], parameters["t1"]]])
        return {"x": numpy_two_moons(theta, np.random.default_rng())[0]}

    prior = pyabc.Distribution(t0=pyabc.RV("uniform", -1, 2), t1=pyabc.RV("uniform", -1, 2))
    abc = pyabc.ABCSMC(model, prior, lambda a, b: float(np.linalg.norm(a["x"] - b["x"])),
                       population_size=population, sampler=pyabc.sampler.SingleCoreSampler(),
                       eps=pyabc.ListEpsilon([eps]))
    abc.new("sqlite://", {"x": X_OBS})
    start = time.perf_counter()
    history = abc.run(max_nr_populations=1)
    draws = history.total_nr_simulations
    return draws / (time.perf_counter() - start), draws


def measure(n_sims: int, paths=tuple(PATHS)) -> dict:
    """One row of the table: seconds, draws/s and peak RSS growth per path at `n_sims`."""
    row = {"n_sims": n_sims, "keep": KEEP, "chunk": CHUNK, "threads": numba.get_num_threads(),
           "load_average_before": os.getloadavg()}
    for path in paths:
        seconds, peak = _timed(path, n_sims)
        row[path] = {"seconds": seconds, "draws_per_s": n_sims / seconds, "peak_rss_growth_MB": peak}
    row["load_average_after"] = os.getloadavg()
    for path in paths:
        if path != "numpy" and "numpy" in row:
            row[f"speedup_{path}_vs_numpy"] = row["numpy"]["seconds"] / row[path]["seconds"]
    return row


def _warm_up():
    for path in PATHS:  # JIT and caches outside the timings
        _run(path, 2 * CHUNK // 10)


def run(sizes=SIZES) -> dict:
    """All sizes and pyabc: print the table, write the JSON, return its content."""
    _warm_up()
    rows = [measure(n) for n in sizes]
    content = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "cpus": os.cpu_count(), "threads": numba.get_num_threads(), "rows": rows,
               "bytes_per_simulation_general": BYTES_PER_SIMULATION, "copy_GB_per_s": _copy_bandwidth()}
    lines = [f"rejection on two_moons, best {KEEP} of n, chunk {CHUNK:.0e} (fused {FUSED_CHUNK_SIZE:.0e}), "
             f"{numba.get_num_threads()} Numba "
             f"threads, {os.cpu_count()} CPUs (load average = runnable processes; above the threads = throttled)"]
    lines.append(f"{'n':>6s} {'path':>6s} {'seconds':>8s} {'draws/s':>9s} {'vs numpy':>8s} {'peak MB':>7s} "
                 f"{'load':>5s}")
    for row in rows:
        for path in PATHS:
            speedup = row.get(f"speedup_{path}_vs_numpy", 1.0)
            lines.append(f"{row['n_sims']:6.0e} {path:>6s} {row[path]['seconds']:8.2f} "
                         f"{row[path]['draws_per_s']:9.3g} {speedup:7.2f}x {row[path]['peak_rss_growth_MB']:7.0f} "
                         f"{row['load_average_after'][0]:5.2f}")
    lines.append(f"general path ~{BYTES_PER_SIMULATION} B/simulation; copy bandwidth "
                 f"{content['copy_GB_per_s']:.1f} GB/s")
    if importlib.util.find_spec("pyabc") is not None and PYABC_SIMS > 0:
        pyabc_rate, draws = pyabc_draws_per_second()
        fused_rate = max(row["fused"]["draws_per_s"] for row in rows)
        content["pyabc"] = {"draws": draws, "population": pyabc_population(), "draws_per_s": pyabc_rate,
                            "fused_vs_pyabc": fused_rate / pyabc_rate, "load_average": os.getloadavg()}
        lines.append(f"pyabc rejection ({draws} draws, population {pyabc_population()}): "
                     f"{pyabc_rate:.3g} draws/s; fused / pyabc {fused_rate / pyabc_rate:.0f}x")
    else:
        lines.append("pyabc not installed (pip install 'fastflow[bench]') or FASTFLOW_BENCH_ABC_PYABC_SIMS=0: "
                     "no pyabc row")
    print("\n" + "\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"abc_speed_{datetime.date.today().isoformat()}_cpu.json"
    path.write_text(json.dumps(content, indent=1))
    print(f"wrote {path}")
    return content


@pytest.mark.parametrize("n_sims", SIZES)
def test_rejection_fused_vs_numba_vs_numpy(benchmark, n_sims):
    _warm_up()
    row = benchmark.pedantic(measure, args=(n_sims,), rounds=1, iterations=1)
    benchmark.extra_info.update(row)
    print("\n" + json.dumps(row, indent=1))


def test_pyabc_rejection(benchmark):
    pytest.importorskip("pyabc")
    rate, draws = benchmark.pedantic(pyabc_draws_per_second, rounds=1, iterations=1)
    benchmark.extra_info.update(pyabc_draws_per_s=rate, draws=draws)
    print(f"\npyabc rejection: {draws} draws, {rate:.3g} draws/s")


if __name__ == "__main__":
    run()
