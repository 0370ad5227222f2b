"""Paths hit noise at t = 0 and data at t = 1, their derivatives match autograd, time sampling, bad input."""

import math

import pytest
import torch

from fastflow.fm import PATHS, VelocityMLP, cfm_loss, get_path, odeint, sample_time

EXACT_ENDS = ["ot", "cosine", "linear", "trig"]


@pytest.mark.parametrize("name", EXACT_ENDS)
def test_endpoints(name):
    path = get_path(name)
    x_0, x_1 = torch.randn(6, 3), torch.randn(6, 3)
    x_t, _ = path.sample(torch.zeros(6), x_0, x_1)
    torch.testing.assert_close(x_t, x_0)
    x_t, _ = path.sample(torch.ones(6), x_0, x_1)
    torch.testing.assert_close(x_t, x_1)


@pytest.mark.parametrize("name", EXACT_ENDS)
def test_one_time_for_all_as_a_number_or_a_tensor(name):
    """A Python float (it raised AttributeError), a 0-d tensor and a row of equal times sample alike, in x's dtype."""
    path, x_0, x_1 = get_path(name), torch.randn(4, 2), torch.randn(4, 2)
    torch.manual_seed(0)  # (the stochastic interpolants draw their noise)
    expected = path.sample(torch.full((4,), 0.3), x_0, x_1)
    for t in (0.3, torch.tensor(0.3), torch.tensor(0.3, dtype=torch.float64)):
        torch.manual_seed(0)
        for got, want in zip(path.sample(t, x_0, x_1), expected):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want)


def test_vp_path_is_variance_preserving_and_nearly_noise_at_zero():
    c = get_path("vp").coefficients(torch.linspace(0, 1, 11, dtype=torch.float64))
    torch.testing.assert_close(c.alpha_t**2 + c.sigma_t**2, torch.ones(11, dtype=torch.float64))
    assert c.alpha_t[0] < 0.01 and 1 - 1e-6 < c.alpha_t[-1] <= 1


def test_vp_target_stays_bounded_at_the_data_end():
    """d sigma_t grows as (1 - t)^(-1/2): at t = 1, which the power-law times draw, the clamp of sigma made one row's
    target -5e4 (a batch's loss 1.3e7 instead of 7.6); times stop at 1 - 1e-5."""
    c = get_path("vp").coefficients(torch.tensor([1 - 1e-5, 1.0], dtype=torch.float64))
    assert c.d_sigma_t[1] == c.d_sigma_t[0] and -100 < c.d_sigma_t[1] < 0


@pytest.mark.parametrize("name", sorted(PATHS))
def test_derivatives_match_autograd(name):
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64, requires_grad=True)
    c = get_path(name).coefficients(t)
    for value, derivative in ((c.alpha_t, c.d_alpha_t), (c.sigma_t, c.d_sigma_t), (c.gamma_t, c.d_gamma_t)):
        if not value.requires_grad:
            continue
        (grad,) = torch.autograd.grad(value.sum(), t, retain_graph=True)
        torch.testing.assert_close(grad, derivative.detach())


@pytest.mark.parametrize("name", sorted(PATHS))
def test_sampled_velocity_is_the_time_derivative_of_the_sampled_point(name):
    """dx_t from Path.sample against a central difference of x_t in t with the same noise (the stochastic
    interpolants' γ̇ z term included: the coefficient test alone let it go missing)."""
    path = get_path(name)
    x_0, x_1 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t, h = torch.linspace(0.1, 0.9, 5, dtype=torch.float64), 1e-6

    def sample(times):
        torch.manual_seed(0)  # (the same z for every call)
        return path.sample(times, x_0, x_1)

    _, dx_t = sample(t)
    difference = (sample(t + h)[0] - sample(t - h)[0]) / (2 * h)
    torch.testing.assert_close(dx_t, difference, atol=1e-6, rtol=1e-6)


def test_ot_path_sigma_min():
    path = get_path("ot", sigma_min=0.1)
    x_0, x_1 = torch.randn(4, 2), torch.randn(4, 2)
    x_t, dx_t = path.sample(torch.ones(4), x_0, x_1)
    torch.testing.assert_close(x_t, x_1 + 0.1 * x_0)
    torch.testing.assert_close(dx_t, x_1 - 0.9 * x_0)


def test_power_law_time_mean():
    # p(t) ∝ t^k with k = 1/(1+alpha) has mean (k+1)/(k+2)
    for alpha in (0.0, 1.0, 4.0):
        k = 1 / (1 + alpha)
        t = sample_time(200_000, distribution="power", alpha=alpha, generator=torch.Generator().manual_seed(0))
        assert abs(t.mean().item() - (k + 1) / (k + 2)) < 3e-3
        assert t.min() >= 0 and t.max() <= 1
    assert abs(sample_time(200_000).mean().item() - 0.5) < 3e-3


def test_cfm_loss_passes_times_as_a_column_as_adaptive_solves_do():
    """One convention for per-sample times, (n, 1), in training and in dopri5: a field written t * x scales rows."""
    shapes = []

    def field(t, x_t):
        shapes.append(tuple(t.shape))
        return t * x_t

    cfm_loss(field, get_path("ot"), torch.randn(3, 3))
    odeint(field, torch.randn(3, 3), [0.0, 1.0], method="dopri5")
    assert set(shapes) == {(3, 1)}


def test_cfm_loss_is_smallest_at_the_true_velocity():
    # data δ at μ under the OT path: the velocity (μ - x_t)/(1 - t) equals the regression target
    mu = torch.tensor([[2.0, -1.0]]).expand(4096, 2)
    true = lambda t, x_t: (mu - x_t) / (1 - t).clamp_min(1e-3)  # (t (n, 1))
    path = get_path("ot")
    assert cfm_loss(true, path, mu) < 1e-2 < cfm_loss(lambda t, x_t: torch.zeros_like(x_t), path, mu)
    net = VelocityMLP(2, context_dim=3, hidden=(16,))
    assert cfm_loss(net, path, mu[:8], torch.randn(8, 3), time_distribution="power", alpha=1.0).dim() == 0


def test_bad_input():
    with pytest.raises(ValueError, match="unknown path"):
        get_path("nope")
    with pytest.raises(ValueError, match="sigma_min"):
        get_path("ot", sigma_min=1.5)
    for alpha in (-2.0, math.nan, math.inf):  # (NaN and inf gave NaN times, so a NaN loss)
        with pytest.raises(ValueError, match="finite alpha > -1"):
            sample_time(3, distribution="power", alpha=alpha)
    for name, options in (("linear", dict(scale=math.nan)), ("trig", dict(scale=math.inf)), ("vp", dict(beta_max=math.inf))):
        with pytest.raises(ValueError, match="scale must be finite|beta_max < inf"):
            get_path(name, **options)
    with pytest.raises(ValueError, match="unknown time distribution"):
        sample_time(3, distribution="beta")
    with pytest.raises(ValueError, match="positive int"):
        sample_time(0)
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        cfm_loss(lambda t, x: x, get_path("ot"), torch.randn(3))
    path, x = get_path("ot"), torch.randn(4, 2)
    for t in (torch.rand(4, 4), torch.rand(3), torch.rand(4, 1, 1)):
        with pytest.raises(ValueError, match=r"t must be a scalar, \(4,\) or \(4, 1\)"):
            path.sample(t, x, x)
    times = torch.rand(4)  # ((4, 1) times gave (4, 4, 2), every row at every time; now a column of per-row times)
    for got, want in zip(path.sample(times.unsqueeze(-1), x, x), path.sample(times, x, x)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="x_0 and x_1"):
        path.sample(torch.rand(4), x, torch.randn(4, 3))
    assert path.sample(torch.tensor(0.5), x, x)[0].shape == (4, 2)
    for t in (1.5, -0.5, math.nan, torch.tensor([0.2, 0.3, 1.01, 0.4])):  # (extrapolated or NaN without a word)
        with pytest.raises(ValueError, match=r"times must lie in \[0, 1\]"):
            path.sample(t, x, x)
    for wrong in (lambda t, x_t: x_t[:, :1], lambda t, x_t: x_t[0]):  # (broadcast against the target, trained on)
        with pytest.raises(ValueError, match=r"velocity must return the state's shape \(4, 2\)"):
            cfm_loss(wrong, path, x)
    with pytest.raises(ValueError, match="activation"):
        VelocityMLP(2, activation="sigmoid")
    for options, message in ((dict(hidden=(32.0,)), "hidden width"), (dict(hidden=()), "hidden"),
                             (dict(num_frequencies=2.5), "num_frequencies"), (dict(context_dim=-1), "context_dim")):
        with pytest.raises(ValueError, match=message):  # (fractional sizes: obscure TypeErrors from torch.empty)
            VelocityMLP(2, **options)
    with pytest.raises(ValueError, match="unconditional"):
        VelocityMLP(2)(torch.zeros(3), torch.randn(3, 2), torch.randn(3, 1))
    with pytest.raises(ValueError, match="x_t must be"):
        VelocityMLP(2)(torch.zeros(3), torch.randn(3, 4))


def test_residual_mlp_shapes():
    net = VelocityMLP(3, context_dim=2, hidden=(32, 32, 32), residual=True, activation="gelu")
    assert net(torch.tensor(0.3), torch.randn(5, 3), torch.randn(2)).shape == (5, 3)
