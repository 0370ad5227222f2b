"""A conjugate Gaussian model for the ABC tests: θ ~ N(0, σ0² I₂), x = θ + N(0, σ² I₂)."""

import numpy as np

from fastflow.priors import Gaussian

__all__ = ["PRIOR", "SIGMA", "SIGMA0", "X_OBS", "posterior_moments", "simulate"]

SIGMA0, SIGMA = 1.0, 0.5
PRIOR = Gaussian(np.zeros(2), SIGMA0**2 * np.eye(2))
X_OBS = np.array([0.8, -0.4])


def simulate(theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`(n, 2)` x for `(n, 2)` θ."""
    return theta + SIGMA * rng.standard_normal(theta.shape)


def posterior_moments(x_obs: np.ndarray) -> tuple[np.ndarray, float]:
    """Posterior mean `(2,)` and the variance of each coordinate."""
    shrink = SIGMA0**2 / (SIGMA0**2 + SIGMA**2)
    return shrink * x_obs, shrink * SIGMA**2
