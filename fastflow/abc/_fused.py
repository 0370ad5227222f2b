"""The fused rejection kernel for tasks with a Numba simulator: prior draw, simulation, summaries, scaled
distance and a streaming top-k in one parallel pass over a chunk, nothing of size n materialized.

One kernel serves every task: the task's `simulate` and `summary` (`fastflow.tasks.NumbaSimulator`, batched)
are passed as first-class Numba functions of fixed signatures, the prior as arrays (box-uniform or Gaussian).
The chunk's rows are split into `BLOCKS` contiguous blocks run in parallel; each walks its rows in batches of
`BATCH` (θ, x, s of one batch in small scratch arrays, one call of each task function per batch) and keeps a
max-heap of its best `capacity` (distance, row) pairs under a threshold (the run's current k-th distance, or
eps). Only the rows
that enter the run's best k are then replayed (`rows`) for their θ and summaries: the counter-based RNG
makes a row's draws a function of (key, row) alone, so a replay reproduces it exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numba import njit, prange, set_parallel_chunksize, types

from fastflow.abc._kernels import METRIC_CODES, row_distance
from fastflow.priors import BoxUniform, Gaussian, Prior
from fastflow.tasks import Task
from fastflow.tasks.numba_simulator import ATTEMPT, SIMULATE_SIGNATURE, SUMMARY_SIGNATURE, normal, uniform

__all__ = ["BLOCKS", "FusedSimulator"]

BLOCKS = 16  # parallel blocks per chunk, handed to threads one at a time (balance on a shared machine)
BATCH = 128  # rows per call of the task functions (amortizes the indirect call)
_BOX, _GAUSSIAN = 0, 1


@njit(inline="always")
def _draw_prior(kind, shift, matrix, key, counter, theta, r, z):
    """Row r of θ `(m, dim)` from the prior with counters from `counter` (box: shift + diag(matrix)·u;
    Gaussian: shift + matrix·z, matrix lower-triangular); z `(dim,)` is scratch."""
    dim = theta.shape[1]
    if kind == _BOX:
        for j in range(dim):
            theta[r, j] = shift[j] + matrix[j, j] * uniform(key, counter + j)
    else:
        for j in range(dim):
            z[j] = normal(key, counter + 2 * j)
        for a in range(dim):
            acc = shift[a]
            for b in range(a + 1):
                acc += matrix[a, b] * z[b]
            theta[r, a] = acc


@njit(inline="always")
def _draw(simulate, summary, summarize, kind, shift, matrix, prior_draws, stride, key, first, theta, z, x, s):
    """Rows `first .. first + m - 1` (m = len(theta)): θ `(m, dim)` from the prior, x `(m, dim_x)` simulated,
    s `(m, dim_s)` their summaries with `summarize` (else s is x itself), all written into the given arrays."""
    for r in range(theta.shape[0]):
        _draw_prior(kind, shift, matrix, key, (first + r) * stride, theta, r, z)
    simulate(theta, key, first * stride + prior_draws, stride, x)
    if summarize:
        summary(x, s)


@njit(inline="always")
def _above(d1, i1, d2, i2):
    return d1 > d2 or (d1 == d2 and i1 > i2)


@njit(inline="always")
def _swap(hd, hi, a, b):
    hd[a], hd[b] = hd[b], hd[a]
    hi[a], hi[b] = hi[b], hi[a]


@njit
def _sift_up(hd, hi, pos):
    while pos > 0:
        parent = (pos - 1) // 2
        if not _above(hd[pos], hi[pos], hd[parent], hi[parent]):
            break
        _swap(hd, hi, pos, parent)
        pos = parent


@njit
def _sift_down(hd, hi, size):
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _above(hd[child + 1], hi[child + 1], hd[child], hi[child]):
            child += 1
        if not _above(hd[child], hi[child], hd[pos], hi[pos]):
            break
        _swap(hd, hi, pos, child)
        pos = child


def _best_kernel(simulate, summary, summarize, kind, shift, matrix, prior_draws, stride, dim_x, dim_s, key, n,
                 s_obs, weight, code, threshold, capacity, blocks):
    """Per block, the best ≤ capacity rows of `0..n-1` with distance ≤ threshold: heap distances
    `(blocks, capacity)`, heap rows `(blocks, capacity)`, filled sizes `(blocks,)`, NaN/inf counts `(blocks,)`."""
    step = (n + blocks - 1) // blocks
    heap_d = np.empty((blocks, capacity))
    heap_i = np.empty((blocks, capacity), dtype=np.int64)
    sizes = np.zeros(blocks, dtype=np.int64)
    dropped = np.zeros(blocks, dtype=np.int64)
    dim = shift.shape[0]
    for block in prange(blocks):
        theta, z, x = np.empty((BATCH, dim)), np.empty(dim), np.empty((BATCH, dim_x))
        s = np.empty((BATCH, dim_s)) if summarize else x
        hd, hi = heap_d[block], heap_i[block]
        size, drop, stop = 0, 0, min(n, (block + 1) * step)
        for first in range(block * step, stop, BATCH):
            m = min(BATCH, stop - first)
            _draw(simulate, summary, summarize, kind, shift, matrix, prior_draws, stride, key, first, theta[:m], z,
                  x[:m], s[:m])
            for r in range(m):
                d = row_distance(s, r, s_obs, weight, code)
                if d == np.inf:
                    drop += 1
                elif size < capacity:
                    if d <= threshold:
                        hd[size], hi[size] = d, first + r
                        _sift_up(hd, hi, size)
                        size += 1
                elif d < hd[0]:  # rows ascend within a block: a tie with the root ranks after it
                    hd[0], hi[0] = d, first + r
                    _sift_down(hd, hi, size)
        sizes[block], dropped[block] = size, drop
    return heap_d, heap_i, sizes, dropped


def _rows_kernel(simulate, summary, summarize, kind, shift, matrix, prior_draws, stride, dim_x, dim_s, key, rows):
    """θ `(m, dim_theta)` and summaries `(m, dim_s)` of the given rows `(m,)` of a chunk."""
    m, dim = rows.shape[0], shift.shape[0]
    theta_out, s_out = np.empty((m, dim)), np.empty((m, dim_s))
    for r in prange(m):
        z = np.empty(dim)
        x = np.empty((1, dim_x)) if summarize else s_out[r:r + 1]
        _draw(simulate, summary, summarize, kind, shift, matrix, prior_draws, stride, key, rows[r],
              theta_out[r:r + 1], z, x, s_out[r:r + 1])
    return theta_out, s_out


def _chunk_kernel(simulate, summary, summarize, kind, shift, matrix, prior_draws, stride, dim_x, dim_s, key, n,
                  blocks):
    """θ `(n, dim_theta)` and summaries `(n, dim_s)` of rows `0..n-1` (a pilot chunk), in batches."""
    dim, step = shift.shape[0], (n + blocks - 1) // blocks
    theta_out, s_out = np.empty((n, dim)), np.empty((n, dim_s))
    for block in prange(blocks):
        z, scratch = np.empty(dim), np.empty((BATCH, dim_x))
        stop = min(n, (block + 1) * step)
        for first in range(block * step, stop, BATCH):
            last = min(first + BATCH, stop)
            x = scratch[: last - first] if summarize else s_out[first:last]
            _draw(simulate, summary, summarize, kind, shift, matrix, prior_draws, stride, key, first,
                  theta_out[first:last], z, x, s_out[first:last])
    return theta_out, s_out


@functools.cache
def _kernels():
    """The kernels (best, rows, chunk) compiled for first-class task functions (once, cached on disk)."""
    f8, i8 = types.float64, types.int64
    common = (types.FunctionType(SIMULATE_SIGNATURE), types.FunctionType(SUMMARY_SIGNATURE), types.boolean, i8,
              f8[::1], f8[:, ::1], i8, i8, i8, i8, i8)
    best = types.Tuple((f8[:, ::1], i8[:, ::1], i8[::1], i8[::1]))(*common, i8, f8[::1], f8[:, ::1], i8, f8, i8, i8)
    rows = types.Tuple((f8[:, ::1], f8[:, ::1]))(*common, i8[::1])
    chunk = types.Tuple((f8[:, ::1], f8[:, ::1]))(*common, i8, i8)
    compile_ = functools.partial(njit, parallel=True, cache=True)
    return compile_(best)(_best_kernel), compile_(rows)(_rows_kernel), compile_(chunk)(_chunk_kernel)


def _dynamic(kernel, *arguments):
    """Run a block kernel with its blocks handed out one at a time (a thread slowed by other load does fewer)."""
    previous = set_parallel_chunksize(1)
    try:
        return kernel(*arguments)
    finally:
        set_parallel_chunksize(previous)


@dataclass(frozen=True)
class FusedSimulator:
    """A task's prior, Numba simulator and summaries, run by the fused kernels; picklable (Dask).

    Attributes:
        task: the task whose `numba_simulator` runs.
        summarize: apply the task's summaries (else distances use x itself).
        kind, shift, matrix: the prior (box: low and diag(high − low); Gaussian: loc and Cholesky factor).
        prior_draws: counters the prior uses per row.
    """

    task: Task
    summarize: bool
    kind: int
    shift: np.ndarray
    matrix: np.ndarray
    prior_draws: int

    @staticmethod
    def supports(simulator, prior: Prior, summary) -> str | None:
        """None when the fused path can run this (simulator, prior, summary), else the reason it cannot."""
        if not isinstance(simulator, Task) or simulator.numba_simulator is None:
            return "the simulator is not a task with a numba_simulator"
        if not isinstance(prior, (BoxUniform, Gaussian)):
            return f"the prior is a {type(prior).__name__}, not a BoxUniform or Gaussian"
        if summary is not None and summary != simulator.summary and summary is not simulator.summary_fn:
            return "the summary is not the task's own"
        return None

    @staticmethod
    def build(task: Task, prior: Prior, summary) -> FusedSimulator:
        """The fused simulator of `task` under `prior`, summarizing when `summary` is the task's (see `supports`)."""
        if isinstance(prior, BoxUniform):
            low, high = prior.low.double().numpy(), prior.high.double().numpy()
            kind, shift, matrix, draws = _BOX, low, np.diag(high - low), prior.dim
        else:
            kind, shift, draws = _GAUSSIAN, prior.loc.double().numpy(), 2 * prior.dim
            matrix = prior._dist.scale_tril.double().numpy()
        summarize = summary is not None and task.summary_fn is not None
        return FusedSimulator(task, summarize, kind, np.ascontiguousarray(shift), np.ascontiguousarray(matrix), draws)

    @property
    def dim_x(self) -> int:
        return self.task.dim_x

    @property
    def dim_s(self) -> int:
        return self.task.numba_simulator.dim_s if self.summarize else self.task.dim_x

    def _common(self, key: int) -> tuple:
        numba_simulator = self.task.numba_simulator
        simulate, summary = numba_simulator.compiled(summarize=self.summarize)
        stride = self.prior_draws + numba_simulator.draws
        return (simulate, summary, self.summarize, self.kind, self.shift, self.matrix, self.prior_draws, stride,
                self.dim_x, self.dim_s, int(key))

    def rows(self, key: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """θ `(m, dim_theta)` and summaries `(m, dim_s)` float64 of rows `(m,)` of the chunk with this key."""
        return _kernels()[1](*self._common(key), np.ascontiguousarray(rows, dtype=np.int64))

    def chunk(self, key: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """θ `(n, dim_theta)` and summaries `(n, dim_s)` float64 of rows `0..n-1` of the chunk with this key."""
        return _dynamic(_kernels()[2], *self._common(key), int(n), BLOCKS)

    def best(self, key: int, n: int, s_obs: np.ndarray, weight: np.ndarray, metric: str, threshold: float,
             capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Of rows `0..n-1`, candidates `(distances (c,), rows (c,))` with distance ≤ threshold that contain
        the chunk's best `capacity` (by distance, then row), and the number of NaN/inf rows."""
        if n * (self.prior_draws + self.task.numba_simulator.draws) >= ATTEMPT:
            raise ValueError(f"a chunk of {n} simulations is too large for the fused kernel's counters")
        step = -(-n // BLOCKS)
        capacity = max(1, min(capacity, step))
        weight = np.ascontiguousarray(np.atleast_2d(weight), dtype=np.float64)
        heap_d, heap_i, sizes, dropped = _dynamic(
            _kernels()[0], *self._common(key), int(n), s_obs, weight, METRIC_CODES[metric], float(threshold), capacity,
            BLOCKS)
        filled = np.arange(capacity) < sizes[:, None]
        return heap_d[filled], heap_i[filled], int(dropped.sum())
