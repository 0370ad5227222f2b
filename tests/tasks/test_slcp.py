"""slcp: exact likelihood, simulator moments and layout, and the SIR + MCMC reference posterior."""

import math

import pytest
import torch

from fastflow.metrics import c2st
from fastflow.tasks import get_task

TASK = get_task("slcp")


def _folded(theta):
    return torch.cat((theta[:, :2], theta[:, 2:4].abs(), theta[:, 4:]), dim=-1)


def _covariance(theta):
    s1, s2, rho = theta[:, 2] ** 2, theta[:, 3] ** 2, torch.tanh(theta[:, 4])
    row0 = torch.stack((s1**2 + 1e-6, rho * s1 * s2), -1)
    row1 = torch.stack((rho * s1 * s2, s2**2 + 1e-6), -1)
    return torch.stack((row0, row1), -2)


def test_likelihood_matches_torch_multivariate_normal():
    theta = TASK.prior.sample(200, generator=torch.Generator().manual_seed(0)).double()
    theta[0, 2] = 1e-3  # nearly singular S: s1 ≈ 1e-6
    theta[1, 4] = 3.0  # ρ close to 1
    x = TASK.simulate(theta, generator=torch.Generator().manual_seed(1))
    mvn = torch.distributions.MultivariateNormal(theta[:, None, :2], _covariance(theta)[:, None])
    expected = mvn.log_prob(x.reshape(-1, 4, 2)).sum(-1)
    torch.testing.assert_close(TASK.log_likelihood(theta, x), expected, rtol=1e-9, atol=1e-6)
    # invariant under the sign of θ2 and θ3
    flipped = theta * torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(TASK.log_likelihood(flipped, x), TASK.log_likelihood(theta, x))


def test_simulator_draws_four_points_point_major():
    n = 40_000
    theta = torch.tensor([[0.5, -1.0, 1.2, -0.8, 0.7]]).expand(n, 5)
    x = TASK.simulate(theta, generator=torch.Generator().manual_seed(2)).double().reshape(n, 4, 2)
    cov = _covariance(theta[:1].double())[0]
    for j in range(4):
        points = x[:, j]
        sd = cov.diagonal().sqrt()
        assert ((points.mean(0) - theta[0, :2].double()).abs() < 5 * sd / math.sqrt(n)).all()
        centred = points - points.mean(0)
        sample_cov = centred.T @ centred / (n - 1)
        assert ((sample_cov - cov).abs() < 5 * math.sqrt(2 / n) * (sd[:, None] * sd[None, :])).all()
    # the four draws are independent
    assert abs(float(torch.corrcoef(torch.stack((x[:, 0, 0], x[:, 1, 0])))[0, 1])) < 5 / math.sqrt(n)


def _prior_sir_moments(x_obs, draws, *, seed):
    """Self-normalized importance-sampling mean and sd of folded θ from `draws` prior samples, and the ESS."""
    theta = _folded(TASK.prior.sample(draws, generator=torch.Generator().manual_seed(seed)).double())
    w = torch.softmax(TASK.log_likelihood(theta, x_obs), 0)
    mean = w @ theta
    return mean, (w @ (theta - mean) ** 2).sqrt(), float(1 / (w**2).sum())


def test_reference_agrees_with_prior_sir_and_is_symmetric():
    x_obs = TASK.observation(10)
    samples = TASK.reference_posterior_samples(x_obs, 10_000).double()
    assert TASK.prior.in_support(samples).all()
    # random signs of θ2, θ3: each sign is a fair coin, independent of the other
    positive = samples[:, 2:4] > 0
    assert ((positive.double().mean(0) - 0.5).abs() < 5 * 0.5 / 100).all()
    assert abs(float((positive[:, 0] == positive[:, 1]).double().mean()) - 0.5) < 5 * 0.5 / 100
    mean, sd, ess = _prior_sir_moments(x_obs, 3_000_000, seed=9)
    assert ess > 200
    folded = _folded(samples)
    z = (folded.mean(0) - mean) / (sd / math.sqrt(ess))
    assert z.abs().max() < 5, z
    assert ((folded.std(0) / sd - 1).abs() < 0.25).all()


def _defensive_importance_sample(x_obs, reference, draws, generator):
    """Importance sample of the folded posterior with proposal 0.9·t5(mean, (1.5)²·cov) + 0.1·uniform."""
    folded = _folded(reference)
    mean, cov = folded.mean(0), torch.cov(folded.T) * 1.5**2
    chol = torch.linalg.cholesky(cov)
    df, dim = 5.0, 5
    k = int(0.9 * draws)
    z = torch.randn(k, dim, generator=generator, dtype=torch.float64)
    chi2 = torch.randn(k, int(df), generator=generator, dtype=torch.float64).square().sum(-1)
    t_draws = mean + (z @ chol.T) * (df / chi2).sqrt()[:, None]
    low = torch.tensor([-3.0, -3.0, 0.0, 0.0, -3.0], dtype=torch.float64)
    u_draws = low + torch.rand(draws - k, dim, generator=generator, dtype=torch.float64) * (3.0 - low)
    theta = torch.cat((t_draws, u_draws))
    maha = torch.linalg.solve_triangular(chol, (theta - mean).T, upper=False).T.square().sum(-1)
    log_t = (
        torch.lgamma(torch.tensor((df + dim) / 2)) - torch.lgamma(torch.tensor(df / 2))
        - dim / 2 * math.log(df * math.pi) - chol.diagonal().log().sum()
        - (df + dim) / 2 * torch.log1p(maha / df)
    )
    log_u = torch.full_like(log_t, -math.log(float((3.0 - low).prod())))
    inside = ((theta >= low) & (theta <= 3.0)).all(-1)
    log_u = log_u.masked_fill(~inside, -math.inf)
    log_q = torch.logsumexp(torch.stack((log_t + math.log(0.9), log_u + math.log(0.1))), 0)
    log_target = TASK.log_likelihood(theta.clamp(-3, 3), x_obs).masked_fill(~inside, -math.inf)
    return theta, torch.softmax(log_target - log_q, 0)


def test_folded_walk_proposal_density_sums_the_sign_patterns():
    """q(θ' | θ) of θ' = fold(θ + Lε) is Σ_s N(s θ'; θ, LLᵀ) over the sign flips of θ2, θ3 (up to a constant):
    with a covariance that correlates them with the others, the two directions differ (the Hastings ratio), and
    with one that does not, they agree."""
    from fastflow.tasks.slcp import _log_folded_proposal

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    chol = torch.linalg.cholesky(a @ a.T / 5 + 0.1 * torch.eye(5, dtype=torch.float64))
    start = _folded(0.3 * torch.randn(6, 5, generator=generator, dtype=torch.float64))
    to = _folded(start + 0.5 * torch.randn(6, 5, generator=generator, dtype=torch.float64))
    normal = torch.distributions.MultivariateNormal(torch.zeros(5, dtype=torch.float64), scale_tril=chol)
    flips = [torch.tensor([1.0, 1.0, s2, s3, 1.0], dtype=torch.float64) for s2 in (1, -1) for s3 in (1, -1)]
    expected = torch.logsumexp(torch.stack([normal.log_prob(f * to - start) for f in flips]), 0) - normal.log_prob(
        torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(_log_folded_proposal(to, start, chol), expected)
    assert (_log_folded_proposal(to, start, chol) - _log_folded_proposal(start, to, chol)).abs().max() > 1e-3
    covariance = chol @ chol.T
    uncorrelated = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # θ2, θ3 uncorrelated with the rest
    keep = (uncorrelated[:, None] == uncorrelated[None, :]).double()
    keep[2, 3] = keep[3, 2] = 0.0
    chol_symmetric = torch.linalg.cholesky(covariance * keep)
    torch.testing.assert_close(_log_folded_proposal(to, start, chol_symmetric), _log_folded_proposal(start, to, chol_symmetric))


@pytest.mark.slow
@pytest.mark.parametrize("i", range(1, 11))
def test_reference_against_defensive_importance_sampling(i):
    x_obs = TASK.observation(i)
    reference = TASK.reference_posterior_samples(x_obs, 10_000).double()
    generator = torch.Generator().manual_seed(200 + i)
    theta, w = _defensive_importance_sample(x_obs, reference, 2_000_000, generator)
    ess = float(1 / (w**2).sum())
    assert ess > 20_000, ess
    mean = w @ theta
    sd = (w @ (theta - mean) ** 2).sqrt()
    folded = _folded(reference)
    # the reference sample's mean has sd ≈ sd/√10⁴ when its draws are independent
    z = (folded.mean(0) - mean) / (sd * math.sqrt(1 / 10_000 + 1 / ess))
    assert z.abs().max() < 4.5, z
    assert ((folded.std(0) / sd - 1).abs() < 0.05).all(), folded.std(0) / sd
    resampled = theta[torch.multinomial(w, 5000, replacement=True, generator=generator)]
    assert c2st(resampled, folded[:5000]) < 0.55
