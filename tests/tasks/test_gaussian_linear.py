"""gaussian_linear: analytic posterior moments, reference sample moments and the Gaussian likelihood."""

import math

import torch

from fastflow.tasks import get_task

TASK = get_task("gaussian_linear")


def test_prior_and_likelihood_are_the_sbibm_gaussians():
    assert torch.allclose(TASK.prior.covariance, 0.1 * torch.eye(10))
    theta = TASK.prior.sample(50, generator=torch.Generator().manual_seed(0)).double()
    x = TASK.observation(1)
    noise = torch.distributions.MultivariateNormal(theta, 0.1 * torch.eye(10, dtype=torch.float64))
    expected = noise.log_prob(x.double())
    torch.testing.assert_close(TASK.log_likelihood(theta, x), expected)


def test_simulator_noise_has_covariance_point_one():
    n = 40_000
    theta = torch.full((n, 10), 0.3)
    noise = TASK.simulate(theta, generator=torch.Generator().manual_seed(1)).double() - 0.3
    assert noise.mean(0).abs().max() < 5 * math.sqrt(0.1 / n)
    cov = noise.T @ noise / n
    # entries of a sample covariance: sd 0.1·√(2/n) on the diagonal, 0.1/√n off it
    assert (cov - 0.1 * torch.eye(10, dtype=torch.float64)).abs().max() < 5 * 0.1 * math.sqrt(2 / n)


def test_analytic_moments():
    x = TASK.observation(2)
    mean, cov = TASK.reference_posterior_moments(x)
    assert mean.dtype == cov.dtype == torch.float64
    torch.testing.assert_close(mean, 0.5 * x.double())
    torch.testing.assert_close(cov, 0.05 * torch.eye(10, dtype=torch.float64))


def test_reference_sample_moments():
    n = 100_000
    for i in (1, 7):
        x = TASK.observation(i)
        mean, cov = TASK.reference_posterior_moments(x)
        samples = TASK.reference_posterior_samples(x, n).double()
        assert (samples.mean(0) - mean).abs().max() < 5 * math.sqrt(0.05 / n)
        centred = samples - samples.mean(0)
        assert (centred.T @ centred / (n - 1) - cov).abs().max() < 5 * 0.05 * math.sqrt(2 / n)
