"""SBC ranks, their uniformity test and expected coverage, on a conjugate Gaussian model whose posterior is known
exactly: calibrated, overconfident, underconfident and biased versions of it."""

import math

import pytest
import torch

from fastflow.metrics import expected_coverage, sbc_ranks, sbc_uniformity

NOISE = 0.5  # θ ~ N(0, I_2), x = θ + NOISE·ε: the posterior is N(x / (1 + NOISE²), NOISE² / (1 + NOISE²) I)
LEVELS = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)


class GaussianPosterior:
    """The exact posterior, its scale multiplied by `scale` and its mean moved by `shift` (sd units)."""

    def __init__(self, scale=1.0, shift=0.0):
        self.sd = scale * NOISE / math.sqrt(1 + NOISE**2)
        self.shift = shift * NOISE / math.sqrt(1 + NOISE**2)

    def _mean(self, x):
        return x / (1 + NOISE**2) + self.shift

    def sample(self, n, x):
        return self._mean(x) + self.sd * torch.randn(n, *x.shape, dtype=x.dtype)

    def log_prob(self, theta, x):
        return torch.distributions.Normal(self._mean(x), self.sd).log_prob(theta).sum(-1)


def _datasets(n=1000):
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return theta, theta + NOISE * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def test_exact_posterior_has_uniform_ranks_and_covers_each_level():
    theta, x = _datasets()
    torch.manual_seed(1)
    ranks = sbc_ranks(GaussianPosterior(), theta, x, num_posterior_samples=200, batch_size=64)
    assert ranks.shape == (1000, 2) and ranks.dtype == torch.int64 and 0 <= ranks.min() and ranks.max() <= 200
    assert (sbc_uniformity(ranks, 200) > 1e-3).all()
    log_prob_ranks = sbc_ranks(GaussianPosterior(), theta, x, num_posterior_samples=200, reduce="log_prob")
    assert log_prob_ranks.shape == (1000, 1)
    coverage = expected_coverage(log_prob_ranks, 200, LEVELS)
    assert (coverage - LEVELS).abs().max() < 0.05  # binomial sd at most 0.016 over 1000 datasets


def test_few_posterior_samples_keep_the_tests_exact():
    """With 10 draws per dataset the ranks take 11 values: tested at fixed points of their bins, the exact
    posterior's p-values were ~5e-7 (2000 datasets) and coverage at level 0.1 read 0.18; spread over their bins,
    both are exact."""
    theta, x = _datasets(4000)
    torch.manual_seed(2)
    ranks = sbc_ranks(GaussianPosterior(), theta, x, num_posterior_samples=10, batch_size=1000)
    assert (sbc_uniformity(ranks, 10) > 1e-3).all()
    log_prob_ranks = sbc_ranks(GaussianPosterior(), theta, x, num_posterior_samples=10, reduce="log_prob",
                               batch_size=1000)
    levels = torch.tensor([0.05, 0.1, 0.5, 0.9, 0.95, 1.0], dtype=torch.float64)
    assert (expected_coverage(log_prob_ranks, 10, levels) - levels).abs().max() < 0.03  # binomial sd <= 0.008
    assert not torch.equal(sbc_uniformity(ranks, 10, seed=0), sbc_uniformity(ranks, 10, seed=1))
    assert torch.equal(sbc_uniformity(ranks, 10, seed=3), sbc_uniformity(ranks, 10, seed=3))


@pytest.mark.parametrize("scale, shift, coverage_sign", [(0.6, 0.0, -1), (1.6, 0.0, 1), (1.0, 1.0, -1)])
def test_miscalibrated_posteriors_are_flagged(scale, shift, coverage_sign):
    """Overconfident (too narrow), underconfident (too wide) and biased posteriors: non-uniform ranks, and HPD
    regions covering less (or more) than their level."""
    theta, x = _datasets()
    torch.manual_seed(1)
    posterior = GaussianPosterior(scale, shift)
    assert (sbc_uniformity(sbc_ranks(posterior, theta, x, num_posterior_samples=200), 200) < 1e-6).all()
    coverage = expected_coverage(sbc_ranks(posterior, theta, x, num_posterior_samples=200, reduce="log_prob"), 200,
                                 LEVELS)
    assert (coverage_sign * (coverage - LEVELS)[3:6] > 0.1).all()


def test_bad_input_is_refused():
    theta, x = _datasets(10)
    posterior = GaussianPosterior()
    with pytest.raises(ValueError, match="same N"):
        sbc_ranks(posterior, theta, x[:5])
    with pytest.raises(ValueError, match="reduce"):
        sbc_ranks(posterior, theta, x, reduce="mean")
    with pytest.raises(ValueError, match="differ in D"):  # an (N, 1) θ broadcast against the draws' 2 coordinates
        sbc_ranks(posterior, theta[:, :1], x)
    with pytest.raises(ValueError, match="must be finite"):
        sbc_ranks(posterior, theta.index_fill(0, torch.tensor([2]), math.nan), x)
    with pytest.raises(ValueError, match="seed"):
        sbc_uniformity(torch.tensor([[3], [1]]), 10, seed=-1)
    with pytest.raises(ValueError, match="num_posterior_samples"):
        sbc_ranks(posterior, theta, x, num_posterior_samples=0)
    with pytest.raises(ValueError, match="integers in 0..num_posterior_samples"):
        sbc_uniformity(torch.tensor([[3], [11]]), 10)
    with pytest.raises(ValueError, match=r"\(N, 1\) log_prob ranks"):
        expected_coverage(torch.zeros(4, 2, dtype=torch.long), 10, LEVELS)
    with pytest.raises(ValueError, match="levels"):
        expected_coverage(torch.zeros(4, 1, dtype=torch.long), 10, [0.5, 1.5])
