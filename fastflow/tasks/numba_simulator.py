"""Per-row Numba simulators of the tasks, for the fused ABC kernel (`fastflow.abc.rejection` on a task).

Randomness is counter-based: the j-th uniform of row i in a chunk is `uniform(key, i * stride + j)`, a
splitmix64 hash of (key, counter) mapped to (0, 1), where `key` is derived from (seed, chunk) and `stride`
is the number of counters a row uses (prior draws, then the simulator's `draws`). Rejection loops retry at
`counter + t * ATTEMPT`, above every row's counters. A row's draws therefore do not depend on the thread that
runs it, on the chunk's split into blocks, or on the rows around it: a row can be replayed alone.
Transcendentals dominate the cost (cos ~20 ns, log ~8 ns, one hash ~1.5 ns), so normals come from a
128-layer ziggurat (Marsaglia & Tsang 2000; one hash and a table look-up ~99% of the time, ~4 ns) rather than
Box-Muller (~35 ns) or the polar method (~22 ns). For one key the counters walk the splitmix64 sequence
(a BigCrush-passing generator); two chunks' keys would have to lie within ~10⁸ steps of each other (a chunk's
counters) for their streams to overlap: probability ~10⁻¹¹ per pair of chunks. This stream differs from the
torch simulators' (`Task.simulate`): the same seed gives a different, equally distributed, set of simulations.

A task's `NumbaSimulator` holds plain per-row Python functions (taking whole arrays and a row index: a row
view would cost a reference count, as much as a two_moons simulation); `compiled()` wraps them in loops over a
batch of rows with fixed signatures, so the ABC kernel takes them as first-class functions (one call per batch):
one disk-cached kernel serves every task.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numba import njit, types

__all__ = ["ATTEMPT", "SIMULATE_SIGNATURE", "SUMMARY_SIGNATURE", "NumbaSimulator", "normal", "uniform"]

SIMULATE_SIGNATURE = types.void(types.float64[:, ::1], types.int64, types.int64, types.int64, types.float64[:, ::1])
"""`simulate(theta (m, dim_theta), key, counter, stride, x (m, dim_x))`: row r of x simulated from theta[r]
with counters from `counter + r * stride`."""
SUMMARY_SIGNATURE = types.void(types.float64[:, ::1], types.float64[:, ::1])
"""`summary(x (m, dim_x), s (m, dim_s))`: the summary statistics of each row."""
ATTEMPT = 1 << 40
"""Counter offset of a rejection loop's retry; rows' own counters must stay below it."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


@njit(inline="always")
def _bits(key, counter):
    """64 random bits from the int64 pair (key, counter): splitmix64's output at step `counter`."""
    z = np.uint64(key) + np.uint64(counter + 1) * _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(inline="always")
def uniform(key, counter):
    """A float64 in (0, 1) from the int64 pair (key, counter), 53 random bits."""
    return (np.float64(_bits(key, counter) >> _S11) + 0.5) * (1.0 / 9007199254740992.0)


def _ziggurat_edges(layers: int = 128, r: float = 3.442619855899, area: float = 9.91256303526217e-3) -> np.ndarray:
    """`(layers + 1,)` right edges of the ziggurat's layers under exp(-x²/2): edge 0 the base strip's
    pseudo-width (area / f(r)), edge 1 = r, then up to edge `layers` = 0 (Marsaglia & Tsang 2000)."""
    edges = np.empty(layers + 1)
    edges[0], edges[1], edges[layers] = area / math.exp(-0.5 * r * r), r, 0.0
    for i in range(1, layers - 1):
        edges[i + 1] = math.sqrt(-2.0 * math.log(area / edges[i] + math.exp(-0.5 * edges[i] ** 2)))
    return edges


_EDGES = _ziggurat_edges()
_HEIGHTS = np.exp(-0.5 * _EDGES**2)  # f at each edge
_TAIL = _EDGES[1]
_LAYER_MASK, _SIGN_BIT = np.uint64(127), np.uint64(128)


@njit(inline="always")
def normal(key, counter):
    """A standard normal, ziggurat with 128 layers: the bits at `counter` pick a layer (7 bits), a sign (1) and
    a position (53); ~99% fall inside the layer's rectangle under the density and return at once, the rest
    are accepted or retried with uniforms at `counter + t * ATTEMPT` (the wedge; Marsaglia's tail beyond r).
    Uses the counter `counter` (2 are reserved, as for a Box-Muller pair)."""
    attempt = 0
    while True:
        z = _bits(key, counter + attempt * ATTEMPT)
        layer = np.int64(z & _LAYER_MASK)
        sign = -1.0 if z & _SIGN_BIT else 1.0
        x = (np.float64(z >> _S11) + 0.5) * (1.0 / 9007199254740992.0) * _EDGES[layer]
        if x < _EDGES[layer + 1]:
            return sign * x
        attempt += 1
        if layer == 0:  # beyond r: x = r + e1 / r with e2 > (e1 / r)² / 2, e1, e2 exponential
            while True:
                tail = -math.log(uniform(key, counter + attempt * ATTEMPT)) / _TAIL
                attempt += 2
                if -2.0 * math.log(uniform(key, counter + (attempt - 1) * ATTEMPT)) > tail * tail:
                    return sign * (_TAIL + tail)
        low = _HEIGHTS[layer]
        y = low + uniform(key, counter + attempt * ATTEMPT) * (_HEIGHTS[layer + 1] - low)
        attempt += 1
        if y < math.exp(-0.5 * x * x):
            return sign * x


def _copy_row(x, s, r):
    for j in range(x.shape[1]):
        s[r, j] = x[r, j]


@dataclass(frozen=True)
class NumbaSimulator:
    """A task's simulator (and summaries) one row at a time, for the fused ABC kernel.

    Attributes:
        simulate: plain function `(theta (m, dim_theta), x (m, dim_x), r, key, counter)` writing row r of x,
            simulated from row r of theta; its j-th uniform is `uniform(key, counter + j)`, j < `draws`
            (`normal` takes 2), rejection retries at `+ ATTEMPT`.
        draws: counters one row of `simulate` uses.
        summary: plain function `(x (m, dim_x), s (m, dim_s), r)` writing the summaries of row r (the task's
            `summary_fn`), or None where x itself serves.
        dim_s: length of `summary`'s output (None without summary).
    """

    simulate: Callable
    draws: int
    summary: Callable | None = None
    dim_s: int | None = None

    def __post_init__(self):
        if (self.summary is None) != (self.dim_s is None):
            raise ValueError("give summary and dim_s together")

    def compiled(self, *, summarize: bool = True) -> tuple:
        """The batched `(simulate, summary)` Numba functions of `SIMULATE_SIGNATURE` and `SUMMARY_SIGNATURE`,
        compiled once per process; summary copies x without `summarize` or where the task has none."""
        summary = self.summary if summarize and self.summary is not None else _copy_row
        return _batched_simulate(self.simulate), _batched_summary(summary)


@functools.cache
def _batched_simulate(row: Callable):
    row = njit(row)

    def simulate(theta, key, counter, stride, x):
        for r in range(theta.shape[0]):
            row(theta, x, r, key, counter + r * stride)

    return njit(SIMULATE_SIGNATURE)(simulate)


@functools.cache
def _batched_summary(row: Callable):
    row = njit(row)

    def summary(x, s):
        for r in range(x.shape[0]):
            row(x, s, r)

    return njit(SUMMARY_SIGNATURE)(summary)
