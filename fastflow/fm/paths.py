"""Probability paths x_t = alpha_t x_1 + sigma_t x_0 (+ gamma_t z) from noise x_0 (t = 0) to data x_1 (t = 1),
the conditional flow-matching loss, and the training-time distributions of t."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fastflow._checks import positive_int
from fastflow.fm.pairing import PAIRINGS, ot_pairing
from fastflow.fm.solvers import per_sample_times

__all__ = [
    "PATHS",
    "CondOTPath",
    "CosinePath",
    "LinearInterpolant",
    "Path",
    "PathCoefficients",
    "TrigInterpolant",
    "VPPath",
    "cfm_loss",
    "get_path",
    "sample_time",
]


@dataclass(frozen=True)
class PathCoefficients:
    """alpha_t, sigma_t, gamma_t and their time derivatives, each shaped like t."""

    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    gamma_t: torch.Tensor
    d_alpha_t: torch.Tensor
    d_sigma_t: torch.Tensor
    d_gamma_t: torch.Tensor


class Path:
    """A path x_t = alpha_t x_1 + sigma_t x_0 + gamma_t z with x_0, z ~ N(0, I) independent.

    Gaussian paths (Lipman et al. 2023) have gamma_t = 0; stochastic interpolants (Albergo &
    Vanden-Eijnden 2023) add the latent term gamma_t z. Subclasses define `coefficients(t)`.
    """

    stochastic = False

    def coefficients(self, t: torch.Tensor) -> PathCoefficients:
        raise NotImplementedError

    def sample(self, t: torch.Tensor, x_0: torch.Tensor, x_1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t and the conditional velocity dx_t for t in [0, 1], `(n,)` or `(n, 1)` (the column velocity fields
        get), or a scalar (one time for all); x_0 and x_1 `(n, D)`; both `(n, D)`."""
        if x_0.dim() != 2 or x_1.shape != x_0.shape:
            raise ValueError(f"x_0 and x_1 must both be (n, D), got {tuple(x_0.shape)} and {tuple(x_1.shape)}")
        t = per_sample_times(t, x_0.shape[0], x_0)
        if not ((t >= 0) & (t <= 1)).all():  # (NaN too; outside, the paths extrapolated without a word)
            raise ValueError("the path's times must lie in [0, 1]")
        return self._sample(t, x_0, x_1)

    def _sample(self, t: torch.Tensor, x_0: torch.Tensor, x_1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample` for checked inputs: t `(n,)` or 0-d in x_0's dtype."""
        c = self.coefficients(t.unsqueeze(-1))
        x_t = c.alpha_t * x_1 + c.sigma_t * x_0
        dx_t = c.d_alpha_t * x_1 + c.d_sigma_t * x_0
        if self.stochastic:
            z = torch.randn_like(x_0)
            x_t = x_t + c.gamma_t * z
            dx_t = dx_t + c.d_gamma_t * z
        return x_t, dx_t


def _zeros(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t)


@dataclass(frozen=True)
class CondOTPath(Path):
    """Conditional optimal-transport path: alpha_t = t, sigma_t = 1 - (1 - sigma_min) t (Lipman et al. 2023)."""

    sigma_min: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.sigma_min < 1.0:
            raise ValueError(f"sigma_min must lie in [0, 1), got {self.sigma_min}")

    def coefficients(self, t):
        one = torch.ones_like(t)
        return PathCoefficients(t, 1 - (1 - self.sigma_min) * t, _zeros(t), one, -(1 - self.sigma_min) * one, _zeros(t))


@dataclass(frozen=True)
class CosinePath(Path):
    """Variance-preserving cosine schedule: alpha_t = sin(πt/2), sigma_t = cos(πt/2)."""

    def coefficients(self, t):
        angle = 0.5 * math.pi * t
        return PathCoefficients(
            angle.sin(), angle.cos(), _zeros(t), 0.5 * math.pi * angle.cos(), -0.5 * math.pi * angle.sin(), _zeros(t)
        )


@dataclass(frozen=True)
class VPPath(Path):
    """Variance-preserving path of the VP-SDE (Song et al. 2021) with a linear β schedule, time reversed so
    that t = 1 is data: alpha_t = exp(-T(1 - t) / 2), sigma_t = sqrt(1 - alpha_t²), T(s) = ∫_0^s β. The target's
    d sigma_t grows as (1 - t)^(-1/2) towards the data, so times are taken at most 1 - `T_MAX_GAP` (as VP score
    models train on [ε, 1]; at t = 1, which the power-law time distribution draws, one row's target was -5e4)."""

    T_MAX_GAP = 1e-5

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self):
        if not 0.0 < self.beta_min <= self.beta_max < math.inf:
            raise ValueError(f"need 0 < beta_min <= beta_max < inf, got {self.beta_min}, {self.beta_max}")

    def coefficients(self, t):
        s = (1 - t).clamp_min(self.T_MAX_GAP)
        integral = self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2
        beta = self.beta_min + (self.beta_max - self.beta_min) * s
        alpha = torch.exp(-0.5 * integral)
        sigma = (-torch.expm1(-integral)).clamp_min(1e-12).sqrt()
        d_alpha = 0.5 * beta * alpha
        return PathCoefficients(alpha, sigma, _zeros(t), d_alpha, -alpha * d_alpha / sigma, _zeros(t))


@dataclass(frozen=True)
class _Interpolant(Path):
    """Stochastic interpolant with gamma_t = scale · t (1 - t) (smooth, so its regression target stays bounded)."""

    scale: float = 0.1

    def __post_init__(self):
        if not 0 <= self.scale < math.inf:  # (NaN or inf: a NaN loss at the first step)
            raise ValueError(f"the interpolant's noise scale must be finite and >= 0, got {self.scale}")

    @property
    def stochastic(self):
        return self.scale > 0

    def _gamma(self, t):
        return self.scale * t * (1 - t), self.scale * (1 - 2 * t)


@dataclass(frozen=True)
class LinearInterpolant(_Interpolant):
    """Linear stochastic interpolant: alpha_t = t, sigma_t = 1 - t, gamma_t = scale · t (1 - t)."""

    def coefficients(self, t):
        one = torch.ones_like(t)
        gamma, d_gamma = self._gamma(t)
        return PathCoefficients(t, 1 - t, gamma, one, -one, d_gamma)


@dataclass(frozen=True)
class TrigInterpolant(_Interpolant):
    """Trigonometric stochastic interpolant: alpha_t = sin(πt/2), sigma_t = cos(πt/2), gamma_t = scale · t (1 - t)."""

    def coefficients(self, t):
        base = CosinePath().coefficients(t)
        gamma, d_gamma = self._gamma(t)
        return PathCoefficients(base.alpha_t, base.sigma_t, gamma, base.d_alpha_t, base.d_sigma_t, d_gamma)


PATHS: dict[str, Callable[..., Path]] = {
    "ot": CondOTPath,
    "cosine": CosinePath,
    "vp": VPPath,
    "linear": LinearInterpolant,
    "trig": TrigInterpolant,
}


def get_path(name: str, **options) -> Path:
    """The path registered as `name` ("ot", "cosine", "vp", "linear", "trig") with its options."""
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; known: {sorted(PATHS)}")
    return PATHS[name](**options)


def sample_time(n: int, *, distribution: str = "uniform", alpha: float = 0.0, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """`(n,)` training times in [0, 1].

    Arguments:
        distribution: "uniform", or "power": p(t) ∝ t^(1/(1+alpha)) (FMPE, as printed in Dax et al. 2023), which
            puts more weight near the data end t = 1; drawn by inverse CDF t = u^((1+alpha)/(2+alpha)). (dingo, the
            paper's code, draws p(t) ∝ t^a instead, t = u^(1/(1+a)): its a > 0 is alpha = 1/a - 1 here, e.g. a = 4 is
            alpha = -0.75; sbi's FMPE draws t uniformly, with data at t = 0.)
        alpha: exponent parameter of "power" (> -1); 0 gives p(t) = 2t.
    """
    n = positive_int(n, "n")
    check_time_distribution(distribution, alpha)
    u = torch.rand(n, generator=generator, device=device)
    if distribution == "uniform":
        return u
    return u ** ((1 + alpha) / (2 + alpha))


def check_time_distribution(distribution: str, alpha: float) -> None:
    """A ValueError unless `sample_time` takes this distribution and alpha (finite, > -1 for "power")."""
    if distribution not in ("power", "uniform"):
        raise ValueError(f"unknown time distribution {distribution!r}; known: ['power', 'uniform']")
    if distribution == "power" and not -1 < alpha < math.inf:  # (NaN or inf: NaN times, a NaN loss)
        raise ValueError(f"the power-law time distribution needs a finite alpha > -1, got {alpha}")


def cfm_loss(velocity: Callable[..., torch.Tensor], path: Path, x_1: torch.Tensor, context: torch.Tensor | None = None, *,
             time_distribution: str = "uniform", alpha: float = 0.0, pairing: str = "independent",
             pairing_block: int = 64) -> torch.Tensor:
    """Conditional flow-matching loss E ||v(t, x_t[, context]) - dx_t||² (mean over samples, sum over dims).

    Arguments:
        velocity: `(t (n, 1), x_t (n, D)[, context (n, E)]) -> (n, D)`: per-sample times as a column, as
            adaptive ODE solves pass them (`t * x_t` scales rows in both).
        x_1: `(n, D)` data; x_0 ~ N(0, I) is drawn here.
        context: `(n, E)` conditioning variables, or None.
        pairing: "independent" (x_0 drawn independently of x_1), or "ot": minibatch optimal transport within blocks
            of `pairing_block` rows (`fastflow.fm.pairing.ot_pairing`), for unconditional flows: straighter paths,
            so few-step samplers get closer to the target.
    """
    if x_1.dim() != 2:
        raise ValueError(f"x_1 must be (n, D), got {tuple(x_1.shape)}")
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; choose one of {PAIRINGS}")
    pairing_block = positive_int(pairing_block, "pairing_block")
    if pairing == "ot" and context is not None:
        # (pairing noise with data across contexts would make the noise depend on the context)
        raise ValueError("pairing='ot' is for unconditional flow matching: with a context, use 'independent'")
    t = sample_time(x_1.shape[0], distribution=time_distribution, alpha=alpha, device=x_1.device).to(x_1.dtype)
    x_0 = torch.randn_like(x_1)
    if pairing == "ot":
        x_0 = ot_pairing(x_0, x_1, pairing_block)
    x_t, dx_t = path._sample(t, x_0, x_1)  # (t drawn in [0, 1]: no check, no sync)
    t = t.unsqueeze(-1)
    v = velocity(t, x_t) if context is None else velocity(t, x_t, context)
    if v.shape != dx_t.shape:  # ((n, 1) or (D,) broadcast against the target and trained on without a word)
        raise ValueError(f"the velocity must return the state's shape {tuple(dx_t.shape)}, got {tuple(v.shape)}")
    return (v - dx_t).square().sum(-1).mean()
