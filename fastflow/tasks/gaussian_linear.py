"""gaussian_linear (sbibm): a 10-D Gaussian prior and Gaussian simulator with a conjugate posterior.

Prior θ ~ N(0, 0.1·I) and simulator x ~ N(θ, 0.1·I), both covariances (sbibm passes the precision
inverse(0.1·I)). The posterior is Gaussian with covariance (Σ_p⁻¹ + Σ_x⁻¹)⁻¹ = 0.05·I and mean
Σ_post Σ_x⁻¹ x_obs = x_obs / 2; the reference samples are drawn from it exactly.
"""

from __future__ import annotations

import math

import torch

from fastflow.priors import Gaussian
from fastflow.tasks.numba_simulator import NumbaSimulator, normal
from fastflow.tasks.task import Task

__all__ = ["gaussian_linear"]

DIM = 10
PRIOR_VARIANCE = 0.1
NOISE_VARIANCE = 0.1

PRIOR = Gaussian(torch.zeros(DIM), PRIOR_VARIANCE * torch.eye(DIM))
OBSERVATION_SEEDS = tuple(range(1000000, 1000010))
_NOISE_SD = math.sqrt(NOISE_VARIANCE)


def _simulate(theta: torch.Tensor, generator) -> torch.Tensor:
    eps = torch.randn(theta.shape, generator=generator, dtype=theta.dtype, device=theta.device)
    return theta + math.sqrt(NOISE_VARIANCE) * eps


def _simulate_row(theta, x, i, key, counter):
    """`_simulate` for row i, in Numba (2 counters per coordinate)."""
    for j in range(DIM):
        x[i, j] = theta[i, j] + _NOISE_SD * normal(key, counter + 2 * j)


def _log_likelihood(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sq = ((x - theta) ** 2).sum(-1)
    return -0.5 * sq / NOISE_VARIANCE - 0.5 * DIM * math.log(2 * math.pi * NOISE_VARIANCE)


def _moments(x_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    prior_precision = torch.linalg.inv(PRIOR.covariance.double())
    noise_precision = torch.eye(DIM, dtype=torch.float64) / NOISE_VARIANCE
    covariance = torch.linalg.inv(prior_precision + noise_precision)
    mean = covariance @ (noise_precision @ x_obs + prior_precision @ PRIOR.loc.double())
    return mean, covariance


def _reference(x_obs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    mean, covariance = _moments(x_obs)
    eps = torch.randn(n, DIM, generator=generator, dtype=torch.float64)
    return mean + eps @ torch.linalg.cholesky(covariance).T


def gaussian_linear() -> Task:
    """The gaussian_linear task: θ ∈ R¹⁰, x ∈ R¹⁰, analytic posterior moments."""
    return Task(
        name="gaussian_linear",
        prior=PRIOR,
        dim_x=DIM,
        observation_seeds=OBSERVATION_SEEDS,
        simulator_fn=_simulate,
        log_likelihood_fn=_log_likelihood,
        reference_fn=_reference,
        moments_fn=_moments,
        numba_simulator=NumbaSimulator(_simulate_row, draws=2 * DIM),
    )
