"""The moment checks that NPE's and FMPE's tests share: a posterior fitted on gaussian_linear against its
analytic posterior."""

import torch


def assert_moments_match_analytic(task, posterior, observations=(1, 2)):
    """Samples' means within half a posterior sd, variances within ±30 %, correlations near zero, and
    `posterior.mean` agreeing, for each observation index."""
    for i in observations:
        x_obs = task.observation(i)
        mean, covariance = task.reference_posterior_moments(x_obs)
        torch.manual_seed(0)
        samples = posterior.sample(20_000, x_obs).double()
        sd = covariance.diagonal().sqrt()
        # The posterior sd is 0.22; an amortized fit at 10^4 simulations lands within half of it
        # (ignoring x, the error would be ~3 sd; 20k samples add only 0.01 sd of Monte Carlo noise).
        assert ((samples.mean(0) - mean).abs() / sd).max() < 0.5
        ratio = samples.var(0) / covariance.diagonal()
        assert ((ratio > 0.75) & (ratio < 1.33)).all(), ratio
        off_diagonal = torch.cov(samples.T) - torch.diag(samples.var(0))
        assert off_diagonal.abs().max() < 0.2 * covariance.diagonal().min()
        estimate = posterior.mean(x_obs, num_samples=20_000).double()
        torch.testing.assert_close(estimate, mean, atol=0.5 * sd.max().item(), rtol=0)
