"""two_moons: exact likelihood (normalized, polar Jacobian) and the exact reference sampler vs a dense grid."""

import math

import numpy as np
import torch
from scipy import stats

from fastflow.tasks import get_task

TASK = get_task("two_moons")


def test_likelihood_integrates_to_one_over_x():
    theta = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    h = 0.0005
    u = torch.arange(h / 2, 0.2, h, dtype=torch.float64)
    v = torch.arange(-0.2 + h / 2, 0.2, h, dtype=torch.float64)
    uu, vv = torch.meshgrid(u, v, indexing="ij")
    # x = p + (−|z0|, z1) with p = (u + 0.25, v): integrate over p's half-disc region
    c, s = math.cos(-math.pi / 4), math.sin(-math.pi / 4)
    z0, z1 = c * 0.3 - s * -0.2, s * 0.3 + c * -0.2
    x = torch.stack((uu.flatten() + 0.25 - abs(z0), vv.flatten() + z1), dim=-1)
    log_l = TASK.log_likelihood(theta.expand(x.shape[0], 2), x)
    assert abs(float(log_l.exp().sum()) * h * h - 1.0) < 2e-3
    # zero density where u < 0: no θ maps there
    assert torch.isinf(TASK.log_likelihood(theta, torch.tensor([0.2 - abs(z0), z1]))).all()


def test_simulator_matches_likelihood_radius():
    theta = torch.tensor([[0.5, 0.1]], dtype=torch.float64).expand(20000, 2)
    x = TASK.simulate(theta, generator=torch.Generator().manual_seed(1))
    log_l = TASK.log_likelihood(theta, x)
    assert torch.isfinite(log_l).all()
    c, s = math.cos(-math.pi / 4), math.sin(-math.pi / 4)
    z0, z1 = c * 0.5 - s * 0.1, s * 0.5 + c * 0.1
    p = x - torch.tensor([-abs(z0), z1], dtype=torch.float64)
    r = torch.hypot(p[:, 0] - 0.25, p[:, 1])
    assert abs(float(r.mean()) - 0.1) < 5 * 0.01 / math.sqrt(20000)
    assert abs(float(r.std()) - 0.01) < 0.01 * 5 / math.sqrt(2 * 20000)


def _grid_bin_probabilities(x_obs, bins, h):
    """Exact posterior mass of each of `bins × bins` cells on [-1, 1]², by a midpoint rule of step h."""
    g = torch.arange(-1 + h / 2, 1, h, dtype=torch.float64)
    t0, t1 = torch.meshgrid(g, g, indexing="ij")
    theta = torch.stack((t0.flatten(), t1.flatten()), dim=-1)
    density = TASK.log_likelihood(theta, x_obs.double()).exp().reshape(len(g), len(g))
    per_bin = len(g) // bins
    mass = density.reshape(bins, per_bin, bins, per_bin).sum((1, 3))
    return (mass / mass.sum()).numpy()


# x0 > 0.25 needs |z0| < 0.1: a third of sbibm's draws for (0.3, 0) have p0 − x0 < 0 (TV 0.17 off)
EDGE_X = torch.tensor([0.3, 0.0])


def test_reference_matches_dense_grid():
    # the grid includes the 1/(π r) Jacobian; dropping it moves the histogram by TV ≈ 0.02 (p < 1e-50)
    n, bins = 100_000, 40
    for x_obs in (TASK.observation(1), TASK.observation(4), EDGE_X):
        probs = _grid_bin_probabilities(x_obs, bins, h=0.001)
        samples = TASK.reference_posterior_samples(x_obs, n, seed=11).double().numpy()
        counts, _, _ = np.histogram2d(samples[:, 0], samples[:, 1], bins=bins, range=[[-1, 1], [-1, 1]])
        expected = n * probs
        big = expected >= 5
        observed = np.append(counts[big], counts[~big].sum())
        expected = np.append(expected[big], expected[~big].sum())
        # counts the grid calls (near) impossible must be (near) absent
        assert counts[probs < 1e-9].sum() <= 2
        chi2 = stats.chisquare(observed, expected)
        assert chi2.pvalue > 1e-3, (x_obs, chi2)
        tv = 0.5 * np.abs(observed / n - expected / n).sum()
        assert tv < 0.012, (x_obs, tv)


def test_reference_never_places_mass_where_likelihood_is_zero():
    # sbibm keeps draws with p0 − x0 < 0, which land where the likelihood is 0
    for x_obs in [TASK.observation(i) for i in range(1, 11)] + [EDGE_X]:
        samples = TASK.reference_posterior_samples(x_obs, 10_000)
        assert torch.isfinite(TASK.log_likelihood(samples.double(), x_obs)).all()
