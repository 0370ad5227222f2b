"""Local-linear regression adjustment of ABC samples (Beaumont, Zhang & Balding 2002), as R `abc`'s loclinear.

Accepted θ_i with summaries s_i and distances d_i get kernel weights w_i = K(d_i / h); a weighted least
squares fit θ ≈ α + (s − s_obs)ᵀβ gives the adjusted θ*_i = θ_i − (s_i − s_obs)ᵀβ = α + r_i. Bounded
parameters are regressed on the logit (both bounds) or log (one bound) scale so that θ* stays inside the
support. With the heteroscedastic correction a second fit of log r² on s gives σ(s), and
θ*_i = α + r_i σ(s_obs) / σ(s_i).

One line fits one slope: where the accepted θ fall into separate modes whose θ moves with s in different
directions (two_moons: mirror-image crescents), a pooled fit averages the slopes and blurs every mode.
`adjust_by_mode` finds the modes (`modes`: groups of θ separated by gaps) and fits each on its own.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import NearestNeighbors

from fastflow._checks import positive_finite

__all__ = ["KERNELS", "LLRegression", "adjust_by_mode", "modes"]


def _epanechnikov(u: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - u**2, 0.0, None)


def _triangular(u: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - u, 0.0, None)


def _uniform(u: np.ndarray) -> np.ndarray:
    return (u <= 1.0).astype(np.float64)


def _gaussian(u: np.ndarray) -> np.ndarray:
    # as R abc: a Gaussian of standard deviation h / 2
    return np.exp(-0.5 * (2.0 * u) ** 2)


KERNELS = {"epanechnikov": _epanechnikov, "gaussian": _gaussian, "uniform": _uniform, "triangular": _triangular}
_MARGIN = 1e-10  # distance kept from a bound before the logit/log transform, relative to the coordinate's scale


class LLRegression:
    """Local-linear regression adjustment.

    Arguments:
        kernel: `"epanechnikov"` (default), `"gaussian"`, `"uniform"` or `"triangular"`.
        low, high: `(dim_theta,)` support bounds (±inf where unbounded), e.g. `prior.low, prior.high`;
            coordinates bounded on both sides are regressed on the logit scale, on one side on the log
            scale; None means unbounded.
        heteroscedastic: also correct the residual scale (R abc's `hcorr=TRUE`).

    Attributes (after `fit`):
        weights_: `(n,)` kernel weights of the accepted samples.
        coef_: `(1 + dim_s, dim_theta)` intercept and slopes on the transformed scale, per unit of s.

    References:
        Beaumont, Zhang & Balding (2002), "Approximate Bayesian computation in population genetics",
        Genetics 162. Csilléry, François & Blum (2012), "abc: an R package for ABC", MEE 3.
    """

    def __init__(self, *, kernel: str = "epanechnikov", low=None, high=None, heteroscedastic: bool = False):
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
        self.kernel = kernel
        self.low = None if low is None else _float_vector(low, "low")
        self.high = None if high is None else _float_vector(high, "high")
        if self.low is not None and self.high is not None:
            if self.low.shape != self.high.shape or not (self.low < self.high).all():
                raise ValueError("low and high must have the same shape with low < high")
        self.heteroscedastic = bool(heteroscedastic)

    def fit(self, theta, summaries, s_obs, distances, *, bandwidth: float | None = None) -> LLRegression:
        """Fit the weighted regression of θ on s − s_obs.

        Arguments:
            theta: `(n, dim_theta)` accepted parameters.
            summaries: `(n, dim_s)` their summary statistics.
            s_obs: `(dim_s,)` the observation's summary statistics.
            distances: `(n,)` their distances to s_obs.
            bandwidth: kernel bandwidth h > 0; None uses the largest distance (the ABC tolerance).

        Returns:
            self.
        """
        theta, summaries = _float_matrix(theta, "theta"), _float_matrix(summaries, "summaries")
        s_obs, distances = _float_vector(s_obs, "s_obs"), _float_vector(distances, "distances")
        n, dim_theta = theta.shape
        if summaries.shape[0] != n or distances.shape != (n,):
            raise ValueError(f"theta {theta.shape}, summaries {summaries.shape} and distances {distances.shape} "
                             "must have the same number of rows")
        if s_obs.shape != (summaries.shape[1],):
            raise ValueError(f"s_obs must have shape ({summaries.shape[1]},), got {s_obs.shape}")
        if (distances < 0).any():
            raise ValueError("distances must be non-negative")
        for name, bound in (("low", self.low), ("high", self.high)):
            if bound is not None and bound.shape != (dim_theta,):
                raise ValueError(f"{name} must have shape ({dim_theta},), got {bound.shape}")
        if bandwidth is None:  # (every distance 0, exact matches of discrete summaries: any h weighs them alike)
            h = float(distances.max()) or 1.0
        else:
            if np.ndim(bandwidth) == 0 and hasattr(bandwidth, "item"):  # a 0-d array or tensor
                bandwidth = bandwidth.item()
            h = positive_finite(bandwidth, "the bandwidth")  # (True was h = 1; a torch scalar failed inside numpy)

        self.weights_ = KERNELS[self.kernel](distances / h)
        if np.count_nonzero(self.weights_) <= summaries.shape[1] + 1:
            raise ValueError(f"need more than {summaries.shape[1] + 1} samples with positive kernel weight, "
                             f"got {np.count_nonzero(self.weights_)}; accept more or widen the bandwidth")
        self.s_obs_, self._summaries = s_obs, summaries
        design = self._design(summaries)
        # a summary constant where the kernel weighs (a discrete one, in one mode) gets slope 0, as R's lm drops an
        # aliased column: least squares split the intercept between the two, in that summary's units
        varies = np.concatenate(([True], ~_constant_columns(summaries[self.weights_ > 0])))
        transformed = self._forward(theta)
        self.coef_ = _weighted_fit(design, transformed, self.weights_, varies)
        self._residuals = transformed - design @ self.coef_
        if self.heteroscedastic:
            log_squares = np.log(self._residuals**2 + np.finfo(np.float64).tiny)
            self._log_var_coef = _weighted_fit(design, log_squares, self.weights_, varies)
        return self

    def predict(self, s_obs=None) -> np.ndarray:
        """Adjusted samples `(n, dim_theta)` at `s_obs (dim_s,)` (None: the fitted s_obs), inside the bounds.

        Use them with `weights_` as a weighted sample, or as they are.
        """
        if not hasattr(self, "coef_"):
            raise ValueError("call fit before predict")
        s_obs = self.s_obs_ if s_obs is None else _float_vector(s_obs, "s_obs")
        if s_obs.shape != self.s_obs_.shape:
            raise ValueError(f"s_obs must have shape {self.s_obs_.shape}, got {s_obs.shape}")
        target = self._design(s_obs[None])
        mean = target @ self.coef_
        residuals = self._residuals
        if self.heteroscedastic:
            log_var_fit = self._design(self._summaries) @ self._log_var_coef
            residuals = residuals * np.exp(0.5 * (target @ self._log_var_coef - log_var_fit))
        return self._inverse(mean + residuals)

    def _design(self, summaries: np.ndarray) -> np.ndarray:
        """`(n, 1 + dim_s)`: a column of ones and s − s_obs of the fit."""
        return np.concatenate((np.ones((summaries.shape[0], 1)), summaries - self.s_obs_), axis=1)

    def _bounds(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        low = np.full(dim, -np.inf) if self.low is None else self.low
        high = np.full(dim, np.inf) if self.high is None else self.high
        return low, high

    def _forward(self, theta: np.ndarray) -> np.ndarray:
        low, high = self._bounds(theta.shape[1])
        if ((theta < low) | (theta > high)).any():
            raise ValueError("theta lies outside [low, high]")
        both, only_low, only_high = _kinds(low, high)
        finite_low, finite_high = np.where(np.isfinite(low), low, 0.0), np.where(np.isfinite(high), high, 0.0)
        # kept from a bound: _MARGIN of the coordinate's scale (its width, or the draws' largest distance from a lone
        # bound: 1e-10 absolute collapsed parameters of size 1e-11), and at least 4 spacings of the bound (1e-10 from
        # a bound of 3e6 rounded back onto it: log 0)
        distance = np.where(only_high, finite_high - theta, theta - finite_low)
        scale = np.where(both, finite_high - finite_low, distance.max(axis=0, initial=0.0))
        scale = np.where(scale > 0, scale, 1.0)
        margin = np.maximum(_MARGIN * scale, 4 * np.spacing(np.maximum(np.abs(finite_low), np.abs(finite_high))))
        theta = np.clip(theta, low + margin, high - margin)
        out = theta.copy()
        out[:, both] = np.log((theta[:, both] - low[both]) / (high[both] - theta[:, both]))
        out[:, only_low] = np.log(theta[:, only_low] - low[only_low])
        out[:, only_high] = np.log(high[only_high] - theta[:, only_high])
        return out

    def _inverse(self, transformed: np.ndarray) -> np.ndarray:
        low, high = self._bounds(transformed.shape[1])
        both, only_low, only_high = _kinds(low, high)
        out = transformed.copy()
        out[:, both] = low[both] + (high[both] - low[both]) / (1.0 + np.exp(-transformed[:, both]))
        out[:, only_low] = low[only_low] + np.exp(transformed[:, only_low])
        out[:, only_high] = high[only_high] - np.exp(transformed[:, only_high])
        return out


def modes(theta, *, neighbors: int = 10) -> np.ndarray:
    """`(n,)` mode labels 0, 1, ... (largest mode first) of a sample `theta (n, dim)`: the connected components
    of a graph on its standardized coordinates that joins every draw to its `neighbors` nearest draws (so
    that the tails hang on to their mode) and to every draw closer than the median distance to the
    `neighbors`-th nearest (so that a mode does not break where its density falls off). Modes are the
    groups separated by a gap wider than that median distance."""
    theta = _float_matrix(theta, "theta")
    if isinstance(neighbors, bool) or not isinstance(neighbors, int) or not 1 <= neighbors < theta.shape[0]:
        raise ValueError(f"neighbors must be an int in [1, {theta.shape[0]}), got {neighbors!r}")
    if theta.shape[1] == 1:
        # In 1-D a draw's nearest draws lie on one side, so a gap of ~`neighbors` spacings cuts the graph, and among
        # n spacings the widest is ~ln(n) of them: a unimodal sample of 10^4 split into large pieces (whose separate
        # fits were biased). 2·ln(n) neighbours keep it whole and still part modes with empty space between them.
        neighbors = min(theta.shape[0] - 1, max(neighbors, math.ceil(2 * math.log(theta.shape[0]))))
    scale = theta.std(axis=0)
    scale[scale == 0] = 1.0
    # k-d trees pay off in low dimension only (10^4 draws in 10-D: brute force 0.5 s, k-d tree 4 s)
    algorithm = "kd_tree" if theta.shape[1] <= 3 else "brute"
    search = NearestNeighbors(n_neighbors=neighbors, algorithm=algorithm).fit((theta - theta.mean(axis=0)) / scale)
    nearest = search.kneighbors_graph(mode="distance")
    radius = float(np.median(nearest.max(axis=1).toarray()))
    graph = nearest + search.radius_neighbors_graph(radius=radius)
    labels = connected_components(graph, directed=False)[1]
    order = np.argsort(-np.bincount(labels), kind="stable")
    return np.argsort(order)[labels]


def adjust_by_mode(theta, summaries, s_obs, distances, *, kernel: str = "epanechnikov", neighbors: int = 10,
                   min_size: int | None = None) -> np.ndarray:
    """Adjusted θ `(n, dim_theta)`: an `LLRegression` (θ's own scale, bandwidth the largest distance) fitted
    to each mode of θ (`modes`) of at least `min_size` draws (default max(100, 10·(dim_s + 1))); draws in
    smaller modes get the fit pooled over all draws. Arguments as `LLRegression.fit`."""
    theta, summaries = _float_matrix(theta, "theta"), _float_matrix(summaries, "summaries")
    distances = _float_vector(distances, "distances")
    if summaries.shape[0] != theta.shape[0] or distances.shape != (theta.shape[0],):
        raise ValueError(f"theta {theta.shape}, summaries {summaries.shape} and distances {distances.shape} "
                         "must have the same number of rows")
    min_size = max(100, 10 * (summaries.shape[1] + 1)) if min_size is None else min_size
    # (a sample of `neighbors` draws or fewer is one mode)
    labels = modes(theta, neighbors=neighbors) if theta.shape[0] > neighbors else np.zeros(theta.shape[0], dtype=int)
    own_fit = np.flatnonzero(np.bincount(labels) >= min_size)
    bandwidth = float(distances.max()) or 1.0  # (every distance 0: any h weighs them alike, as LLRegression.fit)

    def adjust(rows: np.ndarray) -> np.ndarray:
        regression = LLRegression(kernel=kernel)
        return regression.fit(theta[rows], summaries[rows], s_obs, distances[rows], bandwidth=bandwidth).predict()

    adjusted = np.empty_like(theta)
    pooled = ~np.isin(labels, own_fit)
    if pooled.any():
        adjusted[pooled] = adjust(np.ones(len(theta), dtype=bool))[pooled]
    for label in own_fit:
        rows = labels == label
        adjusted[rows] = adjust(rows)
    return adjusted


def _kinds(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of the coordinates bounded on both sides, below only, above only."""
    finite_low, finite_high = np.isfinite(low), np.isfinite(high)
    return finite_low & finite_high, finite_low & ~finite_high, ~finite_low & finite_high


def _constant_columns(values: np.ndarray) -> np.ndarray:
    """`(dim,)` True where a column of `(n, dim)` values is constant up to rounding (spread <= 1e-12 of its size)."""
    spread = values.max(axis=0) - values.min(axis=0)
    return spread <= 1e-12 * np.abs(values).max(axis=0)


def _weighted_fit(design: np.ndarray, target: np.ndarray, weights: np.ndarray, varies: np.ndarray) -> np.ndarray:
    """Coefficients `(1 + dim_s, dim_target)` of the weighted least-squares fit of target on the design's `varies`
    columns (the others get 0), regressed on standardized columns (conditioning) and reported per unit of s."""
    columns = design[:, varies]
    per_unit = columns.std(axis=0)
    per_unit[0] = 1.0  # the intercept's column of ones
    coef = np.zeros((design.shape[1], target.shape[1]))
    coef[varies] = _weighted_lstsq(columns / per_unit, target, weights) / per_unit[:, None]
    return coef


def _weighted_lstsq(design: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`(p, d)` coefficients minimizing Σ_i w_i ‖target_i − design_i β‖²."""
    root = np.sqrt(weights)[:, None]
    return np.linalg.lstsq(design * root, target * root, rcond=None)[0]


def _float_matrix(value, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf")
    return array


def _float_vector(value, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {array.shape}")
    if np.isnan(array).any() or (name not in ("low", "high") and not np.isfinite(array).all()):
        raise ValueError(f"{name} contains NaN" + ("" if name in ("low", "high") else " or inf"))
    return array
