"""Rejection ABC over many simulations in bounded memory: chunked simulation, a streaming top-k, Dask.

Simulations are generated chunk by chunk; each chunk is reduced at once to the candidates that can still
enter the best k (Numba, parallel over rows), so memory is O(k + chunk_size) whatever `n_sims` is. Chunk i
draws θ and x from random streams derived from `(seed, i)` only, and candidates are ranked by
(distance, global simulation index), so the accepted set does not depend on how the chunks are grouped:
a Dask run (`client=`) merges its workers' top-k lists into exactly the single-process result.

Two paths produce a chunk. The general one samples θ from the prior (torch), runs any batched simulator and
summary, then reduces the chunk's distances with the Numba (or numpy) kernels. The fused one, chosen for a
task with a `numba_simulator` under a box-uniform or Gaussian prior with no or the task's own summaries, runs
prior, simulator, summaries, distance and top-k in one parallel Numba kernel (`_fused.py`) with a counter-
based RNG: reproducible for a seed, but a different random stream from the general path's torch simulator.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from fastflow._checks import check_seed, positive_finite, positive_int, real_tensor
from fastflow.abc._fused import FusedSimulator
from fastflow.abc._kernels import KERNELS, METRICS
from fastflow.backends import numba_threads
from fastflow.priors import Prior, check_prior
from fastflow.tasks import Task

__all__ = ["RejectionResult", "rejection"]

_MAD_TO_SD = 1.4826  # MAD of a standard normal is 1 / 1.4826
_FRAMEWORKS = ("numpy", "torch")
CHUNK_SIZE = 1_000_000  # default simulations per chunk of the general path, which materializes a chunk
FUSED_CHUNK_SIZE = 10_000_000  # the fused path's default: it materializes nothing, a chunk ends a threshold update
PILOT_SIZE = 100_000  # simulations that estimate the distance scaling (MAD to ~0.4%)


@dataclass(frozen=True)
class RejectionResult:
    """The accepted simulations of a rejection-ABC run, sorted by distance (ties by simulation index).

    Attributes:
        theta: `(k, dim_theta)` float64 accepted parameters.
        summaries: `(k, dim_s)` float64 their summary statistics (unscaled), for regression adjustment.
        distances: `(k,)` float64 their distances to s_obs, ascending.
        index: `(k,)` int64 their global simulation indices in `0..n_sims-1`.
        s_obs: `(dim_s,)` float64 summary statistics of the observation.
        weight: the scaling used by the distance: `(dim_s,)` for euclidean/l1, `(dim_s, dim_s)` whitening
            matrix for mahalanobis.
        tolerance: the tolerance h actually used: the largest accepted distance with `quantile`, else `eps`.
        num_accepted: k (fewer with `eps`, or where NaN/inf simulations leave fewer than k: a warning says so).
        num_dropped: simulations whose summaries or distance were NaN/inf, never accepted.
        num_simulations: simulations run, `n_sims`.
        fused: whether the fused Numba kernel ran prior, simulator and reduction.
    """

    theta: np.ndarray
    summaries: np.ndarray
    distances: np.ndarray
    index: np.ndarray
    s_obs: np.ndarray
    weight: np.ndarray
    tolerance: float
    num_accepted: int
    num_dropped: int
    num_simulations: int
    fused: bool = False


@dataclass(frozen=True)
class _Candidates:
    """The best candidates seen so far: distance, global index, θ and summaries, sorted by (d, index)."""

    distances: np.ndarray
    index: np.ndarray
    theta: np.ndarray
    summaries: np.ndarray
    dropped: int

    @staticmethod
    def empty(dim_theta: int, dim_s: int) -> _Candidates:
        return _Candidates(np.empty(0), np.empty(0, np.int64), np.empty((0, dim_theta)), np.empty((0, dim_s)), 0)

    def merge(self, other: _Candidates, k: int | None) -> _Candidates:
        """The best `k` (all when None) of both sets, ordered by (distance, index)."""
        distances = np.concatenate((self.distances, other.distances))
        index = np.concatenate((self.index, other.index))
        order = np.lexsort((index, distances))[:k]
        return _Candidates(
            distances[order], index[order],
            np.concatenate((self.theta, other.theta))[order], np.concatenate((self.summaries, other.summaries))[order],
            self.dropped + other.dropped,
        )


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to run chunks: picklable, no state."""

    simulator: Callable
    prior: Prior
    framework: str
    summary: Callable | None
    n_sims: int
    chunk_size: int
    seed: int
    s_obs: np.ndarray
    weight: np.ndarray
    metric: str
    backend: str
    k: int | None
    eps: float
    fused: FusedSimulator | None = None

    def length(self, chunk: int) -> int:
        """Simulations in chunk `chunk`."""
        return min(self.chunk_size, self.n_sims - chunk * self.chunk_size)

    def key(self, chunk: int) -> int:
        """The 63-bit seed of chunk `chunk` (torch generator seed, fused kernel RNG key), from (seed, chunk)."""
        return int(np.random.SeedSequence([self.seed, chunk]).generate_state(1, np.uint64)[0] >> np.uint64(1))

    def torch_seed(self, chunk: int) -> int:
        """The seed of chunk `chunk`'s torch generator: torch's CPU generator keeps 32 bits of a seed (the 63-bit
        keys of two chunks could give one stream: duplicate simulations), so the run's 32-bit base plus the chunk,
        distinct for every chunk of a run."""
        base = int(np.random.SeedSequence([self.seed]).generate_state(1, np.uint32)[0])
        return (base + chunk) % 2**32

    def draw(self, chunk: int) -> tuple[np.ndarray, object]:
        """`(θ (n, dim_theta) float64, x (n, dim_x))` for chunk `chunk` on the general path, from streams
        seeded by (seed, chunk); x is in the simulator's framework."""
        n = self.length(chunk)
        numpy_stream = np.random.SeedSequence([self.seed, chunk]).spawn(1)[0]
        generator = torch.Generator().manual_seed(self.torch_seed(chunk))
        theta = self.prior.sample(n, generator=generator)
        if isinstance(self.simulator, Task):
            x = self.simulator.simulate(theta, generator=generator)
        elif self.framework == "torch":  # (simulators get copies: one changing θ in place must not change the draws)
            x = self.simulator(theta.clone(), generator)
        else:
            theta = theta.double().numpy()
            x = self.simulator(theta.copy(), np.random.default_rng(numpy_stream))
        if getattr(x, "ndim", None) != 2 or x.shape[0] != n:
            shape = tuple(getattr(x, "shape", ()))
            raise ValueError(f"the simulator must return an (n, dim_x) batch with n = {n} rows, got shape {shape}")
        return _to_numpy(theta), x

    def simulate(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """`(θ (n, dim_theta), s (n, dim_s))` float64 for chunk `chunk`."""
        if self.fused is not None:
            return self.fused.chunk(self.key(chunk), self.length(chunk))
        theta, x = self.draw(chunk)
        return theta, _summaries(x, self.summary)

    def reduce(self, chunk: int, best: _Candidates, simulated=None) -> _Candidates:
        """Fold chunk `chunk` (simulated now unless given) into the candidates `best`."""
        if self.fused is not None and simulated is None:
            return self._reduce_fused(chunk, best)
        theta, s = self.simulate(chunk) if simulated is None else simulated
        distances_fn, below_fn = KERNELS[self.backend]
        d = distances_fn(s, self.s_obs, self.weight, self.metric)
        finite = d < np.inf
        dropped = d.shape[0] - int(np.count_nonzero(finite))
        threshold = self.eps
        if self.k is not None:
            if best.distances.shape[0] >= self.k:
                threshold = min(threshold, best.distances[-1])
            elif best.distances.shape[0] + d.shape[0] - dropped > self.k:
                pooled = np.concatenate((best.distances, d[finite]))
                threshold = min(threshold, np.partition(pooled, self.k - 1)[self.k - 1])
        keep = below_fn(d, min(threshold, np.finfo(np.float64).max))
        offset = chunk * self.chunk_size
        new = _Candidates(d[keep], keep + offset, theta[keep], s[keep], dropped)
        return best.merge(new, self.k)

    def _reduce_fused(self, chunk: int, best: _Candidates) -> _Candidates:
        """`reduce` by the fused kernel: only the rows entering the best k are replayed for θ and s."""
        n, key, offset = self.length(chunk), self.key(chunk), chunk * self.chunk_size
        threshold = self.eps
        if self.k is not None and best.distances.shape[0] >= self.k:
            threshold = min(threshold, best.distances[-1])
        capacity = n if self.k is None else min(self.k, n)
        d, rows, dropped = self.fused.best(key, n, self.s_obs, self.weight, self.metric, threshold, capacity)
        if self.k is not None and d.shape[0]:
            pooled = np.lexsort((np.concatenate((best.index, rows + offset)), np.concatenate((best.distances, d))))
            entering = pooled[: self.k]
            entering = entering[entering >= best.distances.shape[0]] - best.distances.shape[0]
            d, rows = d[entering], rows[entering]
        theta, s = self.fused.rows(key, rows)
        return best.merge(_Candidates(d, rows + offset, theta, s, dropped), self.k)

    def run(self, chunks: list[int]) -> _Candidates:
        """The candidates of a group of chunks."""
        best = _Candidates.empty(self.prior.dim, self.s_obs.shape[0])
        for chunk in chunks:
            best = self.reduce(chunk, best)
        return best


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def _summaries(x, summary: Callable | None) -> np.ndarray:
    """`(n, dim_s)` float64 summaries of an `(n, dim_x)` batch."""
    n = x.shape[0]
    s = _to_numpy(x if summary is None else summary(x))
    if s.ndim != 2 or s.shape[0] != n:
        raise ValueError(f"the summary must map (n, dim_x) to (n, dim_s) with n = {n} rows, got shape {s.shape}")
    return np.ascontiguousarray(s)


def _weight(pilot: np.ndarray, scale, metric: str) -> np.ndarray:
    """The distance scaling from the pilot's finite summaries `(n, dim_s)`."""
    dim_s = pilot.shape[1]
    if isinstance(scale, str) and scale != "mad":
        raise ValueError(f"scale must be 'mad', None or ({dim_s},) finite positive values, got {scale!r}")
    pilot = pilot[np.isfinite(pilot).all(axis=1)]
    if metric == "mahalanobis":
        if pilot.shape[0] <= dim_s:
            raise ValueError(f"mahalanobis needs more than {dim_s} finite pilot simulations, got {pilot.shape[0]}")
        covariance = np.cov(pilot, rowvar=False).reshape(dim_s, dim_s)
        try:
            return np.linalg.inv(np.linalg.cholesky(covariance))
        except np.linalg.LinAlgError:
            raise ValueError("the pilot covariance of the summaries is singular; use distance='euclidean'") from None
    if isinstance(scale, str):
        if pilot.shape[0] < 2:
            raise ValueError("the pilot has fewer than 2 finite simulations; cannot estimate the MAD scale")
        mad = _MAD_TO_SD * np.median(np.abs(pilot - np.median(pilot, axis=0)), axis=0)
        if not (mad > 0).all():
            raise ValueError(f"summary statistics {np.flatnonzero(mad <= 0).tolist()} have zero MAD in the pilot")
        return 1.0 / mad
    if scale is None:
        return np.ones(dim_s)
    scale = _to_numpy(scale)
    if scale.shape != (dim_s,) or not (np.isfinite(scale) & (scale > 0)).all():
        raise ValueError(f"scale must be 'mad', None or ({dim_s},) finite positive values, got {scale}")
    return 1.0 / scale


def rejection(
    simulator: Task | Callable,
    prior: Prior,
    x_obs,
    n_sims: int,
    *,
    quantile: float | None = None,
    eps: float | None = None,
    summary: Callable | None = None,
    distance: str = "euclidean",
    scale="mad",
    chunk_size: int | None = None,
    seed: int = 0,
    framework: str = "numpy",
    backend: str = "numba",
    fused: bool | None = None,
    client=None,
) -> RejectionResult:
    """Rejection ABC: keep the simulations whose summaries lie closest to the observation's.

    Arguments:
        simulator: a `fastflow.tasks.Task`, or a batched callable `(θ (n, dim_theta), rng) -> x (n, dim_x)`:
            with `framework="numpy"` θ is a float64 array and rng a `numpy.random.Generator` (Numba
            `@njit` functions taking a Generator work too); with `framework="torch"` θ is the prior's
            tensor and rng a `torch.Generator`.
        prior: the prior p(θ) (fastflow.priors), sampled with a `torch.Generator` per chunk.
        x_obs: `(dim_x,)` observation, array or tensor.
        n_sims: number of simulations, positive.
        quantile: accept the best `ceil(quantile · n_sims)` simulations, 0 < quantile ≤ 1.
        eps: accept the simulations with distance ≤ eps (with `quantile` too: both must hold). Without
            `quantile` the accepted set is not bounded in size.
        summary: `x (n, dim_x) -> s (n, dim_s)` in the simulator's framework; None uses x itself.
        distance: `"euclidean"`, `"l1"` or `"mahalanobis"` (covariance of the pilot's summaries,
            which makes `scale` irrelevant).
        scale: `"mad"` (median absolute deviation of the pilot: the first `PILOT_SIZE` simulations, over as many
            chunks as they take), None (no scaling) or `(dim_s,)` positive scales; summaries are divided by it.
        chunk_size: simulations per chunk; None: `CHUNK_SIZE` (10^6) on the general path, whose memory is
            O(k + chunk_size), `FUSED_CHUNK_SIZE` (10^7) on the fused path, which holds no chunk in memory.
        seed: chunk i uses random streams derived from (seed, i).
        framework: `"numpy"` or `"torch"`, the calling convention of a callable simulator (tasks are torch).
        backend: `"numba"` (parallel kernels) or `"numpy"` (the vectorized reference), same results.
        fused: run a task through the fused Numba kernel (prior, simulator, summaries, distance and top-k
            in one pass; see the module docstring); None picks it whenever it applies (a task with a
            `numba_simulator`, a BoxUniform/Gaussian prior, `summary` None or the task's, backend numba),
            False forces the general path. Its random stream differs from the torch simulator's.
        client: a `dask.distributed.Client`: chunks are spread over its workers, same result.

    Returns:
        A `RejectionResult` sorted by distance.

    Raises:
        ValueError: bad arguments, x_obs of the wrong length or not finite, a simulator returning a wrong
            batch, or no simulation accepted.
    """
    check_prior(prior)
    if not isinstance(simulator, Task) and not callable(simulator):
        raise TypeError(f"simulator must be a Task or a callable, got {type(simulator).__name__}")
    n_sims = positive_int(n_sims, "n_sims")
    chunk_size = None if chunk_size is None else positive_int(chunk_size, "chunk_size")
    if quantile is None and eps is None:
        raise ValueError("give quantile, eps or both")
    if quantile is not None and (isinstance(quantile, bool) or not isinstance(quantile, numbers.Real)
                                 or not 0 < quantile <= 1):
        raise ValueError(f"quantile must lie in (0, 1], got {quantile!r}")
    if eps is not None:
        positive_finite(eps, "eps")
    if distance not in METRICS:
        raise ValueError(f"unknown distance {distance!r}; known: {', '.join(METRICS)}")
    if framework not in _FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; known: {', '.join(_FRAMEWORKS)}")
    if backend not in KERNELS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(KERNELS)}")
    if isinstance(simulator, Task) and simulator.prior.dim != prior.dim:
        raise ValueError(f"prior has dim {prior.dim}, the task {simulator.name!r} has {simulator.dim_theta} parameters")
    unfused = "backend is numpy" if backend != "numba" else FusedSimulator.supports(simulator, prior, summary)
    if fused and unfused:
        raise ValueError(f"fused=True but the fused path does not apply: {unfused}")
    fused_simulator = None if unfused or fused is False else FusedSimulator.build(simulator, prior, summary)
    if chunk_size is None:
        chunk_size = CHUNK_SIZE if fused_simulator is None else FUSED_CHUNK_SIZE

    numba_threads()  # (the count of fastflow.set_num_threads, for the parallel kernels below)
    x = real_tensor(x_obs, "x_obs").detach().cpu().double()
    if x.ndim != 1:
        raise ValueError(f"x_obs must be 1-D (dim_x,), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x_obs contains NaN or inf")

    # (a relative tolerance: 0.07 · 3e8 is 21000000.000000004 in floating point, which is 21 million draws)
    k = None if quantile is None else max(1, math.ceil(quantile * n_sims * (1 - 1e-12)))
    plan = _Plan(simulator, prior, framework, summary, int(n_sims), int(chunk_size), check_seed(seed),
                 np.empty(0), np.empty(0), distance, backend, k, math.inf if eps is None else float(eps),
                 fused_simulator)
    if fused_simulator is None:
        pilot_theta, pilot_x = plan.draw(0)
        dim_x = pilot_x.shape[1]
        x_native = x.to(pilot_x.dtype) if isinstance(pilot_x, torch.Tensor) else x.numpy()
    else:
        dim_x, x_native = fused_simulator.dim_x, x
    if x.shape[0] != dim_x:
        raise ValueError(f"x_obs has length {x.shape[0]} but the simulator returns x of length {dim_x}")
    s_obs = _summaries(x_native[None], summary)[0]
    if not np.isfinite(s_obs).all():
        raise ValueError("the summary statistics of x_obs contain NaN or inf")
    # the pilot: the first PILOT_SIZE simulations, over as many chunks as they take (simulated once: the general
    # path reduces these chunks from memory; the fused kernel reduces them anew, only the pilot rows are kept)
    pilot_size = min(PILOT_SIZE, n_sims)
    if fused_simulator is None:
        pilot_chunks = [(pilot_theta, _summaries(pilot_x, summary))]
        while len(pilot_chunks) * chunk_size < pilot_size:
            pilot_chunks.append(plan.simulate(len(pilot_chunks)))
        pilot = np.concatenate([s for _, s in pilot_chunks])[:pilot_size]
    else:
        starts = range(0, pilot_size, chunk_size)
        pilot_chunks = [None] * len(starts)
        pilot = np.concatenate([fused_simulator.chunk(plan.key(chunk), min(chunk_size, pilot_size - start))[1]
                                for chunk, start in enumerate(starts)])
    plan = replace(plan, s_obs=s_obs, weight=_weight(pilot, scale, distance))

    n_chunks = math.ceil(n_sims / chunk_size)
    best = _Candidates.empty(prior.dim, s_obs.shape[0])
    for chunk, simulated in enumerate(pilot_chunks):
        best = plan.reduce(chunk, best, simulated)
    rest = list(range(len(pilot_chunks), n_chunks))
    if client is None:
        for chunk in rest:
            best = plan.reduce(chunk, best)
    elif rest:
        workers = max(1, len(client.scheduler_info()["workers"]))
        groups = [rest[i::workers] for i in range(workers) if rest[i::workers]]
        [plan_future] = client.scatter([plan], broadcast=True)
        for part in client.gather(client.map(_run_group, [plan_future] * len(groups), groups, pure=False)):
            best = best.merge(part, k)

    if best.distances.shape[0] == 0:
        raise ValueError(
            f"no simulation accepted (eps={eps}, {best.dropped} of {n_sims} simulations dropped as NaN/inf); "
            "raise eps or n_sims"
        )
    if k is not None and eps is None and best.distances.shape[0] < k:
        warnings.warn(f"accepted {best.distances.shape[0]} simulations, not {k}: {best.dropped} of {n_sims} were "
                      "dropped as NaN/inf", RuntimeWarning, stacklevel=2)
    tolerance = float(eps) if k is None else float(best.distances[-1])
    return RejectionResult(
        theta=best.theta, summaries=best.summaries, distances=best.distances, index=best.index, s_obs=s_obs,
        weight=plan.weight, tolerance=tolerance, num_accepted=int(best.distances.shape[0]),
        num_dropped=best.dropped, num_simulations=int(n_sims), fused=fused_simulator is not None,
    )


def _run_group(plan: _Plan, chunks: list[int]) -> _Candidates:
    return plan.run(chunks)

