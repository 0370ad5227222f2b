"""Priors p(θ) over parameter vectors: a box-uniform and a Gaussian, batched and seedable."""

from __future__ import annotations

import math

import torch

from fastflow._checks import floating_tensor, positive_int

__all__ = ["BoxUniform", "Gaussian", "Prior", "check_prior", "prior_from_config"]


class Prior:
    """Common interface of a prior over θ of shape `(dim,)`.

    Attributes:
        dim: number of parameters.
        low, high: `(dim,)` support bounds (±inf where unbounded).
    """

    dim: int
    low: torch.Tensor
    high: torch.Tensor

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw `(n, dim)` samples."""
        raise NotImplementedError

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        """Log-density of `(*, dim)` θ, `-inf` outside the support; returns `(*,)`."""
        raise NotImplementedError

    @property
    def bounded(self) -> bool:
        """True when every coordinate has a finite lower and upper bound."""
        return bool(torch.isfinite(self.low).all() and torch.isfinite(self.high).all())

    @property
    def constrained(self) -> bool:
        """True when some coordinate has a finite bound (its support is not all of R^dim)."""
        return bool(torch.isfinite(self.low).any() or torch.isfinite(self.high).any())

    def in_support(self, theta: torch.Tensor) -> torch.Tensor:
        """Boolean `(*,)`: θ `(*, dim)` lies inside the support (integer θ compared as floats, as `log_prob` takes
        it)."""
        theta = self._check_theta(theta)
        low, high = (bound.to(theta) for bound in self._support())
        return ((theta >= low) & (theta <= high)).all(-1)

    def _support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The support's bounds `(dim,)` as given (float64 where the prior keeps them so)."""
        return self.low, self.high

    def _check_theta(self, theta) -> torch.Tensor:
        """θ as a float32/float64 tensor `(*, dim)` (numpy arrays taken too; integers in the default dtype, half
        precisions as float32; complex numbers refused: they lost their imaginary parts)."""
        theta = floating_tensor(theta, "θ")  # (Gaussian's triangular solve has no half kernel)
        if theta.dim() == 0 or theta.shape[-1] != self.dim:
            raise ValueError(f"θ must be (*, {self.dim}) for this prior, got {tuple(theta.shape)}")
        return theta


def _vector(values, name: str) -> torch.Tensor:
    """`values` as a float64 vector `(dim,)`, dim >= 1 (a scalar is one coordinate)."""
    vector = torch.as_tensor(values, dtype=torch.float64)
    if vector.dim() > 1 or vector.numel() == 0:
        raise ValueError(f"{name} must be a non-empty vector (dim,), got shape {tuple(vector.shape)}")
    return vector.reshape(-1)


class BoxUniform(Prior):
    """Independent uniform prior on the box `[low, high]`.

    Arguments:
        low, high: `(dim,)` finite bounds with low < high; `low`, `high` hold them in float32, as the samples, and
            the support test uses them as given (float64), so that a float64 θ on a bound such as 0.1 is inside.
    """

    def __init__(self, low, high):
        low, high = _vector(low, "low"), _vector(high, "high")
        if low.shape != high.shape:
            raise ValueError(f"low {tuple(low.shape)} and high {tuple(high.shape)} differ in shape")
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise ValueError("BoxUniform bounds must be finite")
        if not (low < high).all():
            raise ValueError("BoxUniform needs low < high in every coordinate")
        if not (torch.isfinite(low.float()).all() and torch.isfinite(high.float()).all() and (low.float() < high.float()).all()
                and torch.isfinite(high.float() - low.float()).all()):
            # (samples are float32: bounds of 1e39 sampled NaN, [1e8, 1e8 + 1] collapsed to one point, and
            # [-2e38, 2e38] sampled inf, its width overflowing)
            raise ValueError("BoxUniform bounds and widths must be finite and the bounds distinct in float32, the "
                             "samples' precision")
        self.dim = low.numel()
        self._log_volume = float(torch.log(high - low).sum())
        self._exact_low, self._exact_high = low, high
        self.low, self.high = low.float(), high.float()

    def _support(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._exact_low, self._exact_high

    def sample(self, n, *, generator=None):
        n = positive_int(n, "number of prior samples")
        u = torch.rand(n, self.dim, generator=generator)
        return self.low + (self.high - self.low) * u

    def log_prob(self, theta):
        theta = self._check_theta(theta)
        inside = self.in_support(theta)
        lp = torch.full(inside.shape, -self._log_volume, dtype=theta.dtype, device=theta.device)
        return lp.masked_fill(~inside, -math.inf)

    def config(self) -> dict:
        return {"type": "BoxUniform", "low": self._exact_low.tolist(), "high": self._exact_high.tolist()}


class Gaussian(Prior):
    """Multivariate normal prior N(loc, covariance).

    Arguments:
        loc: `(dim,)` mean.
        covariance: `(dim, dim)` symmetric positive-definite covariance.
    """

    def __init__(self, loc, covariance):
        self.loc = _vector(loc, "loc").float()
        if not torch.isfinite(self.loc).all():  # (every draw would be inf or NaN; in float32, the samples' precision)
            raise ValueError(f"Gaussian loc must be finite, got {self.loc.tolist()}")
        self.covariance = torch.as_tensor(covariance, dtype=torch.float32)
        if not torch.isfinite(self.covariance).all():  # (a 1x1 inf covariance sampled ±inf)
            raise ValueError("Gaussian covariance must be finite in float32, the samples' precision")
        self.dim = self.loc.numel()
        if self.covariance.shape != (self.dim, self.dim):
            raise ValueError(f"covariance must be ({self.dim}, {self.dim}), got {tuple(self.covariance.shape)}")
        self._dist = torch.distributions.MultivariateNormal(self.loc, covariance_matrix=self.covariance)
        self.low = torch.full((self.dim,), -math.inf)
        self.high = torch.full((self.dim,), math.inf)

    def sample(self, n, *, generator=None):
        n = positive_int(n, "number of prior samples")
        eps = torch.randn(n, self.dim, generator=generator)
        return self.loc + eps @ self._dist.scale_tril.T

    def log_prob(self, theta):
        theta = self._check_theta(theta)
        scale_tril = self._dist.scale_tril.to(theta)
        return torch.distributions.MultivariateNormal(self.loc.to(theta), scale_tril=scale_tril).log_prob(theta)

    def config(self) -> dict:
        return {"type": "Gaussian", "loc": self.loc.tolist(), "covariance": self.covariance.tolist()}


def check_prior(prior) -> Prior:
    """`prior` when it is a fastflow `Prior`; else a TypeError saying which to use (torch distributions have no
    support bounds or seedable batched sampling here)."""
    if not isinstance(prior, Prior):
        raise TypeError(f"prior must be a fastflow.priors.Prior (BoxUniform, Gaussian), got {type(prior).__name__}")
    return prior


def prior_from_config(config: dict) -> Prior:
    """Rebuild a prior from `Prior.config()` (plain data, no pickled code)."""
    kinds = {"BoxUniform": lambda c: BoxUniform(c["low"], c["high"]), "Gaussian": lambda c: Gaussian(c["loc"], c["covariance"])}
    if config.get("type") not in kinds:
        raise ValueError(f"unknown prior type {config.get('type')!r}; known: {sorted(kinds)}")
    return kinds[config["type"]](config)
