"""slcp (sbibm): simple likelihood, complex posterior — a 5-parameter bivariate Gaussian seen through 4 draws.

Prior θ ~ U(-3, 3)⁵. With m = (θ0, θ1), s1 = θ2², s2 = θ3², ρ = tanh(θ4) and
S = [[s1², ρ s1 s2], [ρ s1 s2, s2²]] + 10⁻⁶·I, x holds 4 iid draws from N(m, S), flattened point-major:
x = [x1_0, x1_1, x2_0, x2_1, …] of dimension 8.

The likelihood is exact and depends on θ2, θ3 only through their squares, so the posterior has four mirror
modes. Reference posterior (sbibm uses SIR, then a flow proposal and rejection): sampling-importance-
resampling from the prior in chunks finds the posterior region; random-walk Metropolis chains, vectorized
over chains, run in the folded space θ2, θ3 ≥ 0 (where the posterior has one mode) from the SIR draws,
with a proposal covariance and scale adapted during burn-in and then frozen (the folded walk's Hastings ratio
sums the step's density over the sign patterns that fold onto a point). Each retained sample gets
independent random signs on θ2 and θ3, which is exact because prior and likelihood are symmetric in them.
With the settings below, 10⁴ samples take about 3 s on 2 cores; tests/tasks/test_slcp.py checks them
against defensive importance sampling (ESS > 2·10⁴) on all 10 observations: means within 4.5 standard
errors, standard deviations within 5 %, C2ST < 0.55 (observed 0.50-0.51).
"""

from __future__ import annotations

import math

import torch

from fastflow.priors import BoxUniform
from fastflow.tasks.numba_simulator import NumbaSimulator, normal
from fastflow.tasks.task import Task

__all__ = ["slcp"]

DIM = 5
NUM_DRAWS = 4
EPS = 1e-6
BOUND = 3.0

PRIOR = BoxUniform(-BOUND * torch.ones(DIM), BOUND * torch.ones(DIM))
OBSERVATION_SEEDS = (1000000, 1000001, 1000002, 1000003, 1000004, 1000005, 1000010, 1000012, 1000008, 1000009)

# Reference sampler settings: prior draws for SIR, chains, burn-in and thinning steps.
SIR_DRAWS = 2_000_000
SIR_CHUNK = 200_000
SIR_KEEP = 20_000
MIN_CHAINS, MAX_CHAINS = 1_000, 10_000
BURN_IN = 1500
ADAPT_EVERY = 25
THIN = 50
TARGET_ACCEPT = 0.3


def _covariance_terms(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries S00, S01, S11 of S, each `(n,)`."""
    s1, s2, rho = theta[:, 2] ** 2, theta[:, 3] ** 2, torch.tanh(theta[:, 4])
    return s1**2 + EPS, rho * s1 * s2, s2**2 + EPS


def _simulate(theta: torch.Tensor, generator) -> torch.Tensor:
    n = theta.shape[0]
    s00, s01, _ = _covariance_terms(theta)
    s2, rho = theta[:, 3] ** 2, torch.tanh(theta[:, 4])
    # Cholesky factor [[a, 0], [b, c]] of S in closed form; c² = S11 − S01² / S00 written without cancellation
    a = torch.sqrt(s00)
    b = s01 / a
    c = torch.sqrt((s2 / torch.cosh(theta[:, 4])) ** 2 + (rho * s2) ** 2 * EPS / s00 + EPS)
    eps = torch.randn(n, NUM_DRAWS, 2, generator=generator, dtype=theta.dtype, device=theta.device)
    x0 = theta[:, None, 0] + a[:, None] * eps[..., 0]
    x1 = theta[:, None, 1] + b[:, None] * eps[..., 0] + c[:, None] * eps[..., 1]
    return torch.stack((x0, x1), dim=-1).reshape(n, 2 * NUM_DRAWS)


def _simulate_row(theta, x, i, key, counter):
    """`_simulate` for row i, in Numba (2 normals per point, 2 counters each)."""
    s1, s2, rho = theta[i, 2] ** 2, theta[i, 3] ** 2, math.tanh(theta[i, 4])
    s00 = s1**2 + EPS
    a = math.sqrt(s00)
    b = rho * s1 * s2 / a
    c = math.sqrt((s2 / math.cosh(theta[i, 4])) ** 2 + (rho * s2) ** 2 * EPS / s00 + EPS)
    for p in range(NUM_DRAWS):
        e0, e1 = normal(key, counter + 4 * p), normal(key, counter + 4 * p + 2)
        x[i, 2 * p] = theta[i, 0] + a * e0
        x[i, 2 * p + 1] = theta[i, 1] + b * e0 + c * e1


def _log_likelihood(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    dtype = theta.dtype
    theta, x = theta.double(), x.double()
    s1, s2 = theta[:, 2] ** 2, theta[:, 3] ** 2
    s00, s01, s11 = _covariance_terms(theta)
    # det S = s1² s2² (1 − ρ²) + EPS (s1² + s2²) + EPS², with 1 − ρ² = 1 / cosh²(θ4): no cancellation
    det = (s1 * s2 / torch.cosh(theta[:, 4])) ** 2 + EPS * (s1**2 + s2**2) + EPS**2
    d = x.reshape(-1, NUM_DRAWS, 2) - theta[:, None, :2]
    d0, d1 = d[..., 0], d[..., 1]
    quad = (s11[:, None] * d0**2 - 2 * s01[:, None] * d0 * d1 + s00[:, None] * d1**2).sum(-1) / det
    log_l = -0.5 * quad - 0.5 * NUM_DRAWS * torch.log(det) - NUM_DRAWS * math.log(2 * math.pi)
    return log_l.to(dtype)


def _log_target(theta: torch.Tensor, x_obs: torch.Tensor) -> torch.Tensor:
    """Unnormalized log posterior `(n,)` of `(n, DIM)` float64 θ: log-likelihood inside the prior box."""
    inside = (theta.abs() <= BOUND).all(-1)
    log_l = _log_likelihood(theta, x_obs.expand(theta.shape[0], -1))
    return log_l.masked_fill(~inside, -math.inf)


def _fold(theta: torch.Tensor) -> torch.Tensor:
    """Map θ2, θ3 to their absolute values."""
    return torch.cat((theta[:, :2], theta[:, 2:4].abs(), theta[:, 4:]), dim=-1)


_SIGNS = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)


def _log_folded_proposal(to: torch.Tensor, start: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """log q(to | start) `(n,)` up to a constant for the folded random walk to = fold(start + chol·ε): the Gaussian
    step's density summed over the four sign patterns of θ2, θ3 that fold onto `to`. With a covariance that
    correlates θ2 or θ3 with the others the terms differ between the two directions, so the walk is not symmetric
    near the folds and needs this Hastings ratio."""
    unfolded = to.unsqueeze(0).repeat(len(_SIGNS), 1, 1)  # (4, n, DIM)
    unfolded[:, :, 2:4] *= _SIGNS[:, None, :]
    steps = torch.linalg.solve_triangular(chol, (unfolded - start).reshape(-1, DIM).T, upper=False)
    return torch.logsumexp(-0.5 * steps.square().sum(0).reshape(len(_SIGNS), -1), dim=0)


def _sir(x_obs: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` folded SIR draws from the prior, and the `(DIM, DIM)` weighted covariance of the kept pool."""
    pool_theta, pool_logw = None, None
    for _ in range(SIR_DRAWS // SIR_CHUNK):
        theta = PRIOR.sample(SIR_CHUNK, generator=generator).double()
        log_w = _log_target(theta, x_obs)
        if pool_theta is not None:
            theta, log_w = torch.cat((pool_theta, theta)), torch.cat((pool_logw, log_w))
        top = torch.topk(log_w, SIR_KEEP).indices
        pool_theta, pool_logw = theta[top], log_w[top]
    pool_theta = _fold(pool_theta)
    weights = torch.softmax(pool_logw, dim=0)
    mean = weights @ pool_theta
    centred = pool_theta - mean
    covariance = (weights[:, None] * centred).T @ centred
    index = torch.multinomial(weights, n, replacement=True, generator=generator)
    return pool_theta[index], covariance


def _reference(x_obs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    # enough chains for a well-conditioned population covariance even when few samples are asked for
    n_chains = min(max(n, MIN_CHAINS), MAX_CHAINS)
    state, covariance = _sir(x_obs, n_chains, generator)
    log_p = _log_target(state, x_obs)
    log_scale = math.log(2.38 / math.sqrt(DIM))
    jitter = 1e-10 * torch.eye(DIM, dtype=torch.float64)
    chol = torch.linalg.cholesky(covariance + jitter)

    def step(state, log_p, chol, scale):
        noise = torch.randn(n_chains, DIM, generator=generator, dtype=torch.float64)
        proposal = _fold(state + scale * noise @ chol.T)
        log_p_new = _log_target(proposal, x_obs)
        u = torch.rand(n_chains, generator=generator, dtype=torch.float64)
        hastings = _log_folded_proposal(state, proposal, scale * chol) - _log_folded_proposal(proposal, state, scale * chol)
        accept = torch.log(u) < log_p_new - log_p + hastings
        state = torch.where(accept[:, None], proposal, state)
        log_p = torch.where(accept, log_p_new, log_p)
        return state, log_p, accept.double().mean().item()

    for t in range(BURN_IN):
        state, log_p, rate = step(state, log_p, chol, math.exp(log_scale))
        log_scale += (rate - TARGET_ACCEPT) / math.sqrt(1 + t / ADAPT_EVERY)
        if (t + 1) % ADAPT_EVERY == 0:
            centred = state - state.mean(0)
            chol = torch.linalg.cholesky(centred.T @ centred / (n_chains - 1) + jitter)

    rounds = math.ceil(n / n_chains)
    scale, samples = math.exp(log_scale), []
    for step_index in range(1, rounds * THIN + 1):
        state, log_p, _ = step(state, log_p, chol, scale)
        if step_index % THIN == 0:
            samples.append(state)
    samples = torch.cat(samples)[:n]
    signs = torch.where(torch.rand(n, 2, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return torch.cat((samples[:, :2], signs * samples[:, 2:4], samples[:, 4:]), dim=-1)


def _summary(x: torch.Tensor) -> torch.Tensor:
    """`(n, 5)` summaries of the 4 points: means and standard deviations of both coordinates, their correlation."""
    points = x.reshape(-1, NUM_DRAWS, 2)
    mean = points.mean(1)
    centred = points - mean[:, None]
    sd = centred.pow(2).mean(1).sqrt()
    correlation = (centred[..., 0] * centred[..., 1]).mean(1) / (sd[:, 0] * sd[:, 1]).clamp_min(1e-12)
    return torch.cat((mean, sd, correlation[:, None]), dim=-1)


def _summary_row(x, s, i):
    """`_summary` for row i, in Numba: s[i] = (mean0, mean1, sd0, sd1, correlation)."""
    mean0, mean1 = 0.0, 0.0
    for p in range(NUM_DRAWS):
        mean0 += x[i, 2 * p]
        mean1 += x[i, 2 * p + 1]
    mean0, mean1 = mean0 / NUM_DRAWS, mean1 / NUM_DRAWS
    var0, var1, cov = 0.0, 0.0, 0.0
    for p in range(NUM_DRAWS):
        d0, d1 = x[i, 2 * p] - mean0, x[i, 2 * p + 1] - mean1
        var0 += d0 * d0
        var1 += d1 * d1
        cov += d0 * d1
    sd0, sd1 = math.sqrt(var0 / NUM_DRAWS), math.sqrt(var1 / NUM_DRAWS)
    s[i, 0], s[i, 1], s[i, 2], s[i, 3] = mean0, mean1, sd0, sd1
    s[i, 4] = cov / NUM_DRAWS / max(sd0 * sd1, 1e-12)


def slcp() -> Task:
    """The slcp task: θ ∈ [-3, 3]⁵, x of dimension 8 (4 draws of a 2-D Gaussian)."""
    return Task(
        name="slcp",
        prior=PRIOR,
        dim_x=2 * NUM_DRAWS,
        observation_seeds=OBSERVATION_SEEDS,
        simulator_fn=_simulate,
        log_likelihood_fn=_log_likelihood,
        reference_fn=_reference,
        summary_fn=_summary,
        numba_simulator=NumbaSimulator(_simulate_row, draws=4 * NUM_DRAWS, summary=_summary_row, dim_s=5),
    )
