"""gaussian_mixture: per-sample mixture simulator, likelihood, and the reference vs its analytic marginals."""

import math

import numpy as np
import torch
from scipy import stats

from fastflow.tasks import get_task

TASK = get_task("gaussian_mixture")


def test_likelihood_is_the_two_scale_mixture():
    theta = TASK.prior.sample(64, generator=torch.Generator().manual_seed(0)).double()
    x = torch.tensor([1.5, -2.0])
    eye = torch.eye(2, dtype=torch.float64)
    wide = torch.distributions.MultivariateNormal(theta, eye).log_prob(x.double())
    narrow = torch.distributions.MultivariateNormal(theta, 0.01 * eye).log_prob(x.double())
    expected = torch.logsumexp(torch.stack((wide, narrow)), 0) + math.log(0.5)
    torch.testing.assert_close(TASK.log_likelihood(theta, x), expected)


def test_simulator_picks_a_component_per_sample():
    n = 50_000
    x = TASK.simulate(torch.zeros(n, 2), generator=torch.Generator().manual_seed(2)).double()
    # P(|x| < 0.3) = ½ (1 − e^{−0.045}) + ½ (1 − e^{−4.5}); one component per batch would give 0.04 or 0.99
    inside = float((x.norm(dim=1) < 0.3).double().mean())
    expected = 0.5 * (1 - math.exp(-0.045)) + 0.5 * (1 - math.exp(-4.5))
    assert abs(inside - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
    assert abs(float(x.var(0).mean()) - 0.5 * (1 + 0.01)) < 0.02


def _marginal_bin_probabilities(x_obs, edges, axis):
    """Exact posterior mass of θ_axis in consecutive `edges` bins (mixture around x_obs truncated to the box)."""
    x_obs = x_obs.double().numpy()
    other = 1 - axis
    weights, masses = [], []
    for scale in (1.0, 0.1):
        box = [stats.norm.cdf((10 - x_obs[k]) / scale) - stats.norm.cdf((-10 - x_obs[k]) / scale) for k in (0, 1)]
        weights.append(0.5 * box[0] * box[1])
        cdf = stats.norm.cdf((edges - x_obs[axis]) / scale)
        masses.append(0.5 * np.diff(cdf) * box[other])
    return (masses[0] + masses[1]) / sum(weights)


def test_reference_matches_analytic_marginals():
    n = 100_000
    # observation 1 and a point next to a corner of the box, where the truncation reweights the components
    for x_obs in (TASK.observation(1), torch.tensor([9.7, -9.9])):
        samples = TASK.reference_posterior_samples(x_obs, n, seed=3).double().numpy()
        assert (np.abs(samples) <= 10).all()
        for axis in (0, 1):
            centre = float(x_obs[axis])
            inner = np.linspace(centre - 0.3, centre + 0.3, 13)
            outer = np.linspace(centre - 4, centre + 4, 17)
            edges = np.unique(np.clip(np.concatenate(([-10.0, 10.0], inner, outer)), -10, 10))
            probs = _marginal_bin_probabilities(x_obs, edges, axis)
            assert abs(probs.sum() - 1) < 1e-9
            counts, _ = np.histogram(samples[:, axis], bins=edges)
            keep = probs * n >= 5
            observed = np.append(counts[keep], counts[~keep].sum())
            expected = np.append(probs[keep], probs[~keep].sum()) * n
            assert stats.chisquare(observed, expected).pvalue > 1e-3, (x_obs, axis)
