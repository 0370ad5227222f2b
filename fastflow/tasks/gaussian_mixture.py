"""gaussian_mixture (sbibm): a 2-D uniform prior and a two-scale Gaussian mixture simulator.

Prior θ ~ U(-10, 10)²; simulator x ~ ½ N(θ, I) + ½ N(θ, 0.1²·I). Each simulation picks its own mixture
component; sbibm instead draws one component per simulator call and applies it to the whole batch (a
quirk that correlates a batch), which this module does not reproduce. The posterior is the same mixture
centred at x_obs, truncated to the prior box; the reference samples are exact, by rejection.
"""

from __future__ import annotations

import math

import torch

from fastflow.priors import BoxUniform
from fastflow.tasks.numba_simulator import NumbaSimulator, normal, uniform
from fastflow.tasks.task import Task, rejection_batches

__all__ = ["gaussian_mixture"]

DIM = 2
BOUND = 10.0
SCALES = (1.0, 0.1)
WEIGHTS = (0.5, 0.5)

PRIOR = BoxUniform(-BOUND * torch.ones(DIM), BOUND * torch.ones(DIM))
OBSERVATION_SEEDS = tuple(range(1000000, 1000010))


def _mixture_noise(n: int, generator, *, dtype, device=None) -> torch.Tensor:
    """`(n, DIM)` draws of the zero-centred mixture ½ N(0, I) + ½ N(0, 0.1²·I), one component per row."""
    pick_second = torch.rand(n, 1, generator=generator, dtype=dtype, device=device) < WEIGHTS[1]
    scale = torch.where(pick_second, SCALES[1], SCALES[0])
    return scale * torch.randn(n, DIM, generator=generator, dtype=dtype, device=device)


def _simulate(theta: torch.Tensor, generator) -> torch.Tensor:
    return theta + _mixture_noise(theta.shape[0], generator, dtype=theta.dtype, device=theta.device)


def _simulate_row(theta, x, i, key, counter):
    """`_simulate` for row i, in Numba (1 counter for the component, then 2 per coordinate)."""
    scale = SCALES[1] if uniform(key, counter) < WEIGHTS[1] else SCALES[0]
    for j in range(DIM):
        x[i, j] = theta[i, j] + scale * normal(key, counter + 1 + 2 * j)


def _log_likelihood(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sq = ((x - theta) ** 2).sum(-1)
    terms = [
        math.log(w) - 0.5 * sq / s**2 - DIM * math.log(s) - 0.5 * DIM * math.log(2 * math.pi)
        for w, s in zip(WEIGHTS, SCALES)
    ]
    return torch.logsumexp(torch.stack(terms), dim=0)


def _reference(x_obs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    def propose(m: int) -> torch.Tensor:
        theta = x_obs + _mixture_noise(m, generator, dtype=torch.float64)
        return theta[PRIOR.in_support(theta)]

    return rejection_batches(propose, n)


def gaussian_mixture() -> Task:
    """The gaussian_mixture task: θ ∈ [-10, 10]², x of dimension 2."""
    return Task(
        name="gaussian_mixture",
        prior=PRIOR,
        dim_x=DIM,
        observation_seeds=OBSERVATION_SEEDS,
        simulator_fn=_simulate,
        log_likelihood_fn=_log_likelihood,
        reference_fn=_reference,
        numba_simulator=NumbaSimulator(_simulate_row, draws=1 + 2 * DIM),
    )
