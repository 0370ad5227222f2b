"""two_moons (sbibm): a crescent-shaped simulator whose posterior is two moons, with an exact reference.

Simulator: a ~ U(-π/2, π/2), r ~ N(0.1, 0.01²), p = (r cos a + 0.25, r sin a); with the rotation
z = R(-π/4) θ, i.e. z0 = c θ0 − s θ1, z1 = s θ0 + c θ1 (c = cos(-π/4), s = sin(-π/4)), x = p + (−|z0|, z1).

Likelihood: the density of p = (u + 0.25, v) is N(r; 0.1, 0.01²) / (π r) for u > 0 with r = √(u² + v²)
(polar Jacobian 1/r, angle density 1/π), zero for u < 0. sbibm's `_likelihood` omits the 1/(π r) factor;
here it is included, so `log_likelihood` integrates to 1 over x. The r < 0 tail of N(0.1, 0.01²) (mass
~1e-23) is ignored.

Reference posterior: the simulator noise is inverted as in sbibm (draw p, |z0| = p0 − x0, z1 = x1 − p1,
a random sign for z0, rotate back, reject outside the prior), vectorized in batches. Unlike sbibm, draws
with p0 − x0 < 0 (for which no θ exists) are rejected too, which makes the sampler exact.
"""

from __future__ import annotations

import math

import torch

from fastflow.priors import BoxUniform
from numba import njit

from fastflow.tasks.numba_simulator import ATTEMPT, NumbaSimulator, normal, uniform
from fastflow.tasks.task import Task, rejection_batches

__all__ = ["two_moons"]

A_LOW, A_HIGH = -math.pi / 2, math.pi / 2
R_LOC, R_SCALE = 0.1, 0.01
BASE_OFFSET = 0.25
_C, _S = math.cos(-math.pi / 4), math.sin(-math.pi / 4)

PRIOR = BoxUniform(-torch.ones(2), torch.ones(2))
OBSERVATION_SEEDS = (1000011, 1000001, 1000002, 1000003, 1000013, 1000005, 1000006, 1000007, 1000008, 1000009)


def _sample_p(n: int, generator, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """`(n, 2)` draws of the crescent noise p."""
    a = A_LOW + (A_HIGH - A_LOW) * torch.rand(n, generator=generator, dtype=dtype, device=device)
    r = R_LOC + R_SCALE * torch.randn(n, generator=generator, dtype=dtype, device=device)
    return torch.stack((r * torch.cos(a) + BASE_OFFSET, r * torch.sin(a)), dim=-1)


def _shift(theta: torch.Tensor) -> torch.Tensor:
    """`(n, 2)` the θ-dependent shift (−|z0|, z1)."""
    z0 = _C * theta[:, 0] - _S * theta[:, 1]
    z1 = _S * theta[:, 0] + _C * theta[:, 1]
    return torch.stack((-z0.abs(), z1), dim=-1)


def _simulate(theta: torch.Tensor, generator) -> torch.Tensor:
    p = _sample_p(theta.shape[0], generator, dtype=theta.dtype, device=theta.device)
    return p + _shift(theta)


@njit(inline="always")
def _half_circle(key, counter):
    """(cos a, sin a) for a ~ U(A_LOW, A_HIGH) = U(-π/2, π/2): a point uniform in the right half disk,
    normalized (no trig)."""
    while True:
        u, v = uniform(key, counter), 2.0 * uniform(key, counter + 1) - 1.0
        q = u * u + v * v
        if 0.0 < q < 1.0:
            inverse = 1.0 / math.sqrt(q)
            return u * inverse, v * inverse
        counter += ATTEMPT


def _simulate_row(theta, x, i, key, counter):
    """`_simulate` for row i, in Numba (4 counters: the angle, then the radius's normal)."""
    cos_a, sin_a = _half_circle(key, counter)
    r = R_LOC + R_SCALE * normal(key, counter + 2)
    z0 = _C * theta[i, 0] - _S * theta[i, 1]
    z1 = _S * theta[i, 0] + _C * theta[i, 1]
    x[i, 0] = r * cos_a + BASE_OFFSET - abs(z0)
    x[i, 1] = r * sin_a + z1


def _log_likelihood(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    p = x - _shift(theta)
    u, v = p[:, 0] - BASE_OFFSET, p[:, 1]
    r = torch.sqrt(u**2 + v**2)
    log_normal = -0.5 * ((r - R_LOC) / R_SCALE) ** 2 - 0.5 * math.log(2 * math.pi * R_SCALE**2)
    log_p = log_normal - torch.log(math.pi * r)
    return log_p.masked_fill(u <= 0, -math.inf)


def _reference(x_obs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    def propose(m: int) -> torch.Tensor:
        p = _sample_p(m, generator, dtype=torch.float64)
        abs_z0 = p[:, 0] - x_obs[0]
        sign = torch.where(torch.rand(m, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
        z0, z1 = sign * abs_z0, x_obs[1] - p[:, 1]
        # θ = R(π/4) z, the inverse rotation
        theta = torch.stack((_C * z0 + _S * z1, -_S * z0 + _C * z1), dim=-1)
        keep = (abs_z0 >= 0) & PRIOR.in_support(theta)
        return theta[keep]

    return rejection_batches(propose, n)


def two_moons() -> Task:
    """The two_moons task: θ ∈ [-1, 1]², x of dimension 2."""
    return Task(
        name="two_moons",
        prior=PRIOR,
        dim_x=2,
        observation_seeds=OBSERVATION_SEEDS,
        simulator_fn=_simulate,
        log_likelihood_fn=_log_likelihood,
        reference_fn=_reference,
        numba_simulator=NumbaSimulator(_simulate_row, draws=4),
    )
