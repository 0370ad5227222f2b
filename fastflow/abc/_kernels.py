"""Per-chunk rejection kernels: distances to s_obs and the indices under a threshold, in Numba and numpy.

Each backend offers the same two functions over one chunk of `n` simulations with `m` summaries:
- `distances(summaries (n, m), s_obs (m,), weight, metric) -> (n,)` float64, `inf` for rows whose distance
  is not finite (NaN/inf summaries). `weight` is `(m,)` (a diagonal scaling) for `"euclidean"`/`"l1"`
  and `(m, m)` (a whitening matrix W, distance ‖W (s − s_obs)‖₂) for `"mahalanobis"`.
- `below(d (n,), threshold) -> (k,)` int64 ascending indices with `d <= threshold`.

The Numba kernels are parallel over rows (prange) and read each row once; the numpy ones are the readable
reference and the baseline that the benchmark compares against.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["KERNELS", "METRICS", "METRIC_CODES", "row_distance"]

METRICS = ("euclidean", "l1", "mahalanobis")
METRIC_CODES = {name: code for code, name in enumerate(METRICS)}
_BLOCKS = 64  # row blocks of the parallel compaction (a few per thread, balanced)


@njit(inline="always")
def row_distance(s, i, s_obs, weight, code):
    """Distance of summary row `s[i]` (`s` is `(n, m)`) to `s_obs (m,)`: `weight` `(1, m)` for euclidean
    (code 0) and l1 (code 1), `(m, m)` whitening matrix for mahalanobis (code 2); inf when not finite.
    Rows are indexed, not sliced: a row view costs a reference count, as much as the distance itself."""
    m = s.shape[1]
    acc = 0.0
    if code == 2:
        for a in range(m):
            projected = 0.0
            for b in range(m):
                projected += weight[a, b] * (s[i, b] - s_obs[b])
            acc += projected * projected
        acc = np.sqrt(acc)
    elif code == 1:
        for a in range(m):
            acc += abs(weight[0, a] * (s[i, a] - s_obs[a]))
    else:
        for a in range(m):
            diff = weight[0, a] * (s[i, a] - s_obs[a])
            acc += diff * diff
        acc = np.sqrt(acc)
    return acc if np.isfinite(acc) else np.inf


@njit(parallel=True, cache=True, fastmath=False)
def _numba_distances(summaries, s_obs, weight, code):
    n = summaries.shape[0]
    out = np.empty(n)
    for i in prange(n):
        out[i] = row_distance(summaries, i, s_obs, weight, code)
    return out


@njit(parallel=True, cache=True)
def _numba_below(d, threshold):
    n = d.shape[0]
    step = (n + _BLOCKS - 1) // _BLOCKS
    counts = np.zeros(_BLOCKS + 1, dtype=np.int64)
    for b in prange(_BLOCKS):
        count = 0
        for i in range(b * step, min((b + 1) * step, n)):
            if d[i] <= threshold:
                count += 1
        counts[b + 1] = count
    offsets = np.cumsum(counts)
    out = np.empty(offsets[-1], dtype=np.int64)
    for b in prange(_BLOCKS):
        position = offsets[b]
        for i in range(b * step, min((b + 1) * step, n)):
            if d[i] <= threshold:
                out[position] = i
                position += 1
    return out


def numba_distances(summaries: np.ndarray, s_obs: np.ndarray, weight: np.ndarray, metric: str) -> np.ndarray:
    """Numba face of `distances` (see the module docstring)."""
    return _numba_distances(summaries, s_obs, np.atleast_2d(weight), METRIC_CODES[metric])


def numba_below(d: np.ndarray, threshold: float) -> np.ndarray:
    """Numba face of `below` (see the module docstring)."""
    return _numba_below(d, float(threshold))


NUMPY_BLOCK_ROWS = 4096  # rows per block of the numpy distances: the block's coordinates, transposed, stay in cache


def numpy_distances(summaries: np.ndarray, s_obs: np.ndarray, weight: np.ndarray, metric: str) -> np.ndarray:
    """numpy face of `distances` (see the module docstring): by blocks of rows, the coordinates summed one after
    another in `row_distance`'s order, so that both faces give the same bits (numpy's pairwise sums differed in the
    last bit from 9 summaries on, and a tie at the threshold went another way)."""
    n, m = summaries.shape
    d = np.empty(n)
    for start in range(0, n, NUMPY_BLOCK_ROWS):
        diff = (summaries[start:start + NUMPY_BLOCK_ROWS] - s_obs).T.copy()  # (m, rows): one coordinate per row
        acc = np.zeros(diff.shape[1])
        if metric == "mahalanobis":
            projected = np.zeros_like(diff)
            for b in range(m):
                projected += weight[:, b, None] * diff[b]
            for a in range(m):
                acc += projected[a] * projected[a]
        else:
            for a in range(m):
                term = weight[a] * diff[a]
                acc += np.abs(term) if metric == "l1" else term * term
        d[start:start + NUMPY_BLOCK_ROWS] = acc if metric == "l1" else np.sqrt(acc)
    d[~np.isfinite(d)] = np.inf
    return d


def numpy_below(d: np.ndarray, threshold: float) -> np.ndarray:
    """numpy face of `below` (see the module docstring)."""
    return np.flatnonzero(d <= threshold)


KERNELS = {"numba": (numba_distances, numba_below), "numpy": (numpy_distances, numpy_below)}
