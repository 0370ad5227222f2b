"""Priors: sampling moments, densities, support, config round trip and bad input."""

import math

import numpy as np
import pytest
import torch

from fastflow.priors import BoxUniform, Gaussian, check_prior, prior_from_config


def test_box_uniform_samples_density_and_support():
    prior = BoxUniform([-1.0, 0.0], [1.0, 4.0])
    draws = prior.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (100_000, 2) and prior.in_support(draws).all()
    torch.testing.assert_close(draws.mean(0), torch.tensor([0.0, 2.0]), atol=0.02, rtol=0)  # sd/√n ≈ 0.004
    assert prior.log_prob(torch.tensor([[0.0, 1.0]])).item() == pytest.approx(-math.log(8.0))
    assert torch.isinf(prior.log_prob(torch.tensor([[2.0, 1.0]]))).all()
    assert prior.bounded


def test_support_of_integer_theta_compares_as_floats():
    """Integer θ took the bounds' integer casts: 0 was inside [0.5, 1.5] and ±3 outside a Gaussian's (±inf) support."""
    theta = torch.tensor([[0], [1], [2]])
    box = BoxUniform([0.5], [1.5])
    assert box.in_support(theta).tolist() == [False, True, False]
    assert torch.equal(box.in_support(theta), torch.isfinite(box.log_prob(theta)))
    assert Gaussian([0.0], [[1.0]]).in_support(torch.tensor([[-3], [3]])).all()
    with pytest.raises(ValueError, match=r"\(\*, 1\)"):
        box.in_support(torch.zeros(3, 2))


def test_gaussian_density_matches_torch_in_float64():
    covariance = torch.tensor([[0.5, 0.1], [0.1, 0.3]])
    prior = Gaussian([1.0, -1.0], covariance)
    theta = torch.randn(5, 2, dtype=torch.float64)
    expected = torch.distributions.MultivariateNormal(prior.loc.double(), covariance.double()).log_prob(theta)
    torch.testing.assert_close(prior.log_prob(theta), expected)
    draws = prior.sample(np.int64(200_000), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.cov(draws.T), covariance, atol=0.01, rtol=0)
    assert not prior.bounded


@pytest.mark.parametrize("prior", [BoxUniform([0.0], [2.0]), Gaussian([0.0, 1.0], torch.eye(2))])
def test_config_round_trip(prior):
    rebuilt = prior_from_config(prior.config())
    theta = prior.sample(4)
    torch.testing.assert_close(rebuilt.log_prob(theta), prior.log_prob(theta))


def test_bad_input():
    with pytest.raises(ValueError, match="low < high"):
        BoxUniform([1.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        BoxUniform([0.0], [math.inf])
    with pytest.raises(ValueError, match="positive"):
        BoxUniform([0.0], [1.0]).sample(0)
    with pytest.raises(ValueError, match="covariance"):
        Gaussian([0.0, 0.0], torch.eye(3))
    with pytest.raises(ValueError, match="loc must be finite"):  # (every draw was inf)
        Gaussian([math.inf, 0.0], torch.eye(2))
    with pytest.raises(ValueError, match=r"θ must be \(\*, 1\)"):
        BoxUniform([0.0], [1.0]).log_prob(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="non-empty vector"):
        BoxUniform([], [])
    with pytest.raises(ValueError, match="non-empty vector"):  # a 2x2 box used to become a 4-D one
        BoxUniform(torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(TypeError, match="fastflow.priors.Prior"):
        check_prior(torch.distributions.Uniform(torch.zeros(2), torch.ones(2)))
    with pytest.raises(ValueError, match="unknown prior"):
        prior_from_config({"type": "Cauchy"})
    # in float32, the samples' precision: 1e39 sampled NaN, [1e8, 1e8 + 1] one point, [-2e38, 2e38] inf (its width
    # overflows), a 1x1 inf covariance ±inf
    for low, high in (([-1e39], [1e39]), ([1e8], [1e8 + 1]), ([-2e38], [2e38])):
        with pytest.raises(ValueError, match="finite and the bounds distinct in float32"):
            BoxUniform(low, high)
    for covariance in ([[math.inf]], [[1e39]]):
        with pytest.raises(ValueError, match="covariance must be finite"):
            Gaussian([0.0], covariance)
    for prior in (BoxUniform([0.0], [1.0]), Gaussian([0.0], [[1.0]])):
        with pytest.raises(TypeError, match="θ must be real"):
            prior.log_prob(torch.zeros(3, 1, dtype=torch.complex64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_theta_is_evaluated_in_float32(dtype):
    theta = torch.tensor([[0.5], [2.0]])
    for prior in (BoxUniform([0.0], [1.0]), Gaussian([0.0], [[1.0]])):
        torch.testing.assert_close(prior.log_prob(theta.to(dtype)), prior.log_prob(theta))


def test_box_bounds_are_exact_in_float64():
    """Bounds kept in float32 put a float64 θ on the bound 0.1 outside (0.1 rounds up in float32)."""
    prior = BoxUniform([0.1, -0.3], [0.7, 0.3])
    on_bounds = torch.tensor([[0.1, -0.3], [0.7, 0.3]], dtype=torch.float64)
    assert prior.in_support(on_bounds).all() and torch.isfinite(prior.log_prob(on_bounds)).all()
    assert prior.sample(3).dtype == torch.float32
    assert prior.log_prob(np.array([[0.2, 0.0]])).item() == pytest.approx(-math.log(0.6 * 0.6))  # numpy θ too
