"""Local-linear regression adjustment: exactness on a linear model, moments on the conjugate Gaussian,
bounded transforms, kernels, heteroscedastic correction, predict, bad input."""

import numpy as np
import torch
import pytest

from abc_conjugate import PRIOR, X_OBS, posterior_moments, simulate
from fastflow.abc import LLRegression, rejection
from fastflow.abc.regression import KERNELS, adjust_by_mode, modes
from fastflow.priors import BoxUniform, Gaussian


def test_adjustment_removes_an_exact_linear_dependence():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(500, 3))
    beta = np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]])
    noise = 0.1 * rng.normal(size=(500, 2))
    theta = s @ beta + noise
    s_obs = np.array([0.2, -0.1, 0.3])
    distances = np.linalg.norm(s - s_obs, axis=1)
    regression = LLRegression(kernel="uniform").fit(theta, s, s_obs, distances)
    np.testing.assert_allclose(regression.coef_[1:], beta, atol=0.03)
    adjusted = regression.predict()
    np.testing.assert_allclose(adjusted, theta - (s - s_obs) @ regression.coef_[1:], atol=1e-10)
    np.testing.assert_allclose(adjusted.mean(0), s_obs @ beta, atol=0.02)
    # predict at a new s_obs shifts every sample by the fitted slope
    moved = regression.predict(s_obs + np.array([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(moved - adjusted, np.broadcast_to(regression.coef_[1], adjusted.shape), atol=1e-10)


@pytest.mark.parametrize("unit", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("heteroscedastic", [False, True])
def test_a_summary_constant_among_the_draws_gets_no_slope(unit, heteroscedastic):
    """A summary equal to 3 · unit for every draw but observed at 2 · unit is aliased with the intercept: least
    squares split the intercept between them, and the adjusted mean (0.50, -0.003 or 0.01 for units 1, 0.1, 10)
    depended on that summary's units; it is the fit without the summary."""
    rng = np.random.default_rng(0)
    theta = rng.normal(1.0, 0.3, size=(2000, 1))
    summaries = np.c_[theta[:, 0] + 0.1 * rng.normal(size=2000), np.full(2000, 3.0 * unit)]
    s_obs = np.array([1.0, 2.0 * unit])
    distances = np.abs(summaries[:, 0] - s_obs[0])
    fitted = LLRegression(heteroscedastic=heteroscedastic).fit(theta, summaries, s_obs, distances)
    without = LLRegression(heteroscedastic=heteroscedastic).fit(theta, summaries[:, :1], s_obs[:1], distances)
    np.testing.assert_allclose(fitted.predict(), without.predict(), rtol=1e-9, atol=1e-12)
    assert fitted.coef_[2] == 0.0


def test_adjustment_improves_conjugate_moments_at_a_coarse_tolerance():
    result = rejection(simulate, PRIOR, X_OBS, 40_000, quantile=0.2, chunk_size=20_000, seed=4)
    mean, var = posterior_moments(X_OBS)
    adjusted = LLRegression().fit(result.theta, result.summaries, result.s_obs, result.distances).predict()
    plain_error = np.abs(result.theta.var(0) / var - 1).max()
    adjusted_error = np.abs(adjusted.var(0) / var - 1).max()
    assert plain_error > 0.5  # coarse: rejection alone is far too wide
    assert adjusted_error < 0.1 and adjusted_error < plain_error / 5
    se_mean = np.sqrt(var / result.num_accepted)
    assert np.all(np.abs(adjusted.mean(0) - mean) < 5 * se_mean)
    assert np.abs(result.theta.mean(0) - mean).max() > np.abs(adjusted.mean(0) - mean).max()


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("heteroscedastic", [False, True])
def test_bounded_parameters_stay_inside_the_support(kernel, heteroscedastic):
    prior = BoxUniform(np.array([0.0, -1.0]), np.array([1.0, 5.0]))

    def simulator(theta, rng):
        return theta + 0.5 * rng.standard_normal(theta.shape)

    result = rejection(simulator, prior, np.array([0.95, 4.9]), 20_000, quantile=0.1, chunk_size=10_000)
    regression = LLRegression(kernel=kernel, low=prior.low, high=prior.high, heteroscedastic=heteroscedastic)
    adjusted = regression.fit(result.theta, result.summaries, result.s_obs, result.distances).predict()
    assert np.isfinite(adjusted).all()
    assert (adjusted > prior.low.numpy()).all() and (adjusted < prior.high.numpy()).all()
    assert regression.weights_.shape == (result.num_accepted,) and (regression.weights_ >= 0).all()


def test_log_transform_for_one_sided_bounds_and_heteroscedastic_scale():
    rng = np.random.default_rng(1)
    s = rng.uniform(0.5, 2.0, size=(2_000, 1))
    theta = s * np.exp(0.3 * s * rng.normal(size=(2_000, 1)))  # positive, log-scale spread grows with s
    distances = np.abs(s[:, 0] - 1.0)
    plain = LLRegression(low=[0.0]).fit(theta, s, [1.0], distances, bandwidth=2.0).predict()
    corrected = LLRegression(low=[0.0], heteroscedastic=True).fit(theta, s, [1.0], distances, bandwidth=2.0).predict()
    assert (plain > 0).all() and (corrected > 0).all()
    # at s = 1 the log-scale sd is 0.3; the correction brings the spread of the adjusted samples there
    assert abs(np.log(corrected).std() - 0.3) < abs(np.log(plain).std() - 0.3)
    assert abs(np.log(corrected).std() - 0.3) < 0.03


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bandwidth=0.0), "bandwidth"),
        (dict(bandwidth=-1.0), "bandwidth"),
        (dict(bandwidth=float("nan")), "bandwidth"),
        (dict(bandwidth=float("inf")), "bandwidth"),
        (dict(bandwidth=True), "bandwidth"),
        (dict(bandwidth=np.array([1.0, 2.0])), "bandwidth"),
        (dict(s_obs=np.zeros(3)), "s_obs must have shape"),
        (dict(s_obs=np.array([np.nan, 0.0])), "NaN"),
        (dict(theta=np.zeros((49, 2))), "same number of rows"),
        (dict(theta=np.full((50, 2), 7.0)), "outside"),
        (dict(distances=np.r_[np.ones(3), 2.0, np.full(46, 5.0)], bandwidth=1.5), "positive kernel weight"),
    ],
)
def test_bad_input_is_refused(kwargs, message):
    rng = np.random.default_rng(0)
    arguments = dict(theta=rng.uniform(size=(50, 2)), summaries=rng.normal(size=(50, 2)), s_obs=np.zeros(2),
                     distances=rng.uniform(size=50), bandwidth=None)
    arguments.update(kwargs)
    regression = LLRegression(low=[0.0, 0.0], high=[1.0, 1.0])
    with pytest.raises(ValueError, match=message):
        regression.fit(arguments.pop("theta"), arguments.pop("summaries"), arguments.pop("s_obs"),
                       arguments.pop("distances"), **arguments)


def test_kernels_follow_their_formulas_and_weigh_the_fit():
    """R abc's kernels at u = d / h: Epanechnikov 1 - u², triangular 1 - u, uniform 1 on [0, 1], Gaussian of standard
    deviation h / 2; the fit weighs each draw by its kernel."""
    u = np.array([0.0, 0.5, 1.0, 1.5])
    expected = {"epanechnikov": [1.0, 0.75, 0.0, 0.0], "triangular": [1.0, 0.5, 0.0, 0.0],
                "uniform": [1.0, 1.0, 1.0, 0.0], "gaussian": np.exp(-2.0 * u**2)}
    rng = np.random.default_rng(1)
    theta, summaries, distances = rng.uniform(size=(60, 2)), rng.normal(size=(60, 2)), rng.uniform(size=60)
    for name, values in expected.items():
        np.testing.assert_allclose(KERNELS[name](u), values, atol=1e-15)
        weights = LLRegression(kernel=name).fit(theta, summaries, np.zeros(2), distances, bandwidth=1.2).weights_
        np.testing.assert_allclose(weights, KERNELS[name](distances / 1.2))


def test_zero_dimensional_bandwidths():
    rng = np.random.default_rng(0)
    theta, summaries, distances = rng.uniform(size=(50, 2)), rng.normal(size=(50, 2)), rng.uniform(size=50)
    expected = LLRegression().fit(theta, summaries, np.zeros(2), distances, bandwidth=2.0).predict()
    for bandwidth in (np.array(2.0), np.float32(2.0), torch.tensor(2.0)):
        adjusted = LLRegression().fit(theta, summaries, np.zeros(2), distances, bandwidth=bandwidth).predict()
        np.testing.assert_allclose(adjusted, expected)


def test_exact_matches_only_are_left_as_they_are():
    """Discrete summaries: every accepted simulation matches s_obs (distance 0), which raised "the bandwidth must
    be positive"; the adjustment moves nothing (s - s_obs = 0)."""
    theta = np.random.default_rng(0).uniform(size=(40, 2))
    summaries = np.tile([1.0, 2.0], (40, 1))
    adjusted = LLRegression(low=[0.0, 0.0], high=[1.0, 1.0]).fit(theta, summaries, [1.0, 2.0], np.zeros(40)).predict()
    np.testing.assert_allclose(adjusted, theta, atol=1e-12)


def test_unknown_kernel_and_predict_before_fit_are_refused():
    with pytest.raises(ValueError, match="low contains NaN"):
        LLRegression(low=[np.nan])  # (it was taken as unbounded)
    with pytest.raises(ValueError, match="unknown kernel"):
        LLRegression(kernel="cosine")
    with pytest.raises(ValueError, match="low < high"):
        LLRegression(low=[1.0], high=[0.0])
    with pytest.raises(ValueError, match="call fit"):
        LLRegression().predict()


def test_modes_are_the_separated_groups_largest_first():
    rng = np.random.default_rng(0)
    blob = rng.normal(size=(3000, 3))
    labels = modes(np.concatenate((blob[:1000] + 8.0, blob[1000:])))
    assert np.array_equal(np.bincount(labels), [2000, 1000]) and (labels[:1000] == 1).all()
    assert (modes(blob) == 0).all()  # one Gaussian: one mode, its tails included
    with pytest.raises(ValueError, match="neighbors"):
        modes(blob, neighbors=0)


def test_adjustment_by_mode_recovers_both_modes_where_one_pooled_fit_blurs_them():
    # θ ~ N(0, 1), x ~ N(|θ|, σ²): two mirror-image Gaussian modes at ±x_obs / (1 + σ²), variance σ² / (1 + σ²);
    # θ moves with x in opposite directions in the two modes, so a pooled slope is ~0 and adjusts nothing
    sigma, x_obs = 0.1, np.array([1.5])
    mode_mean, mode_var = x_obs[0] / (1 + sigma**2), sigma**2 / (1 + sigma**2)
    result = rejection(lambda theta, rng: np.abs(theta) + sigma * rng.standard_normal(theta.shape),
                       Gaussian(np.zeros(1), np.eye(1)), x_obs, 40_000, quantile=0.2, chunk_size=20_000, seed=3)
    fit = (result.theta, result.summaries, result.s_obs, result.distances)
    by_mode = adjust_by_mode(*fit)
    pooled = LLRegression().fit(*fit).predict()
    for positive in (True, False):
        rows = (result.theta[:, 0] > 0) == positive
        assert 0.4 < rows.mean() < 0.6
        np.testing.assert_allclose(np.abs(by_mode[rows]).mean(), mode_mean, atol=5 * np.sqrt(mode_var / rows.sum()))
        assert abs(by_mode[rows].var() / mode_var - 1) < 0.15
        assert pooled[rows].var() / mode_var > 2  # the rejection tolerance's width, left in place
    # a single mode: the same as one pooled fit
    single = rejection(simulate, PRIOR, X_OBS, 20_000, quantile=0.1, chunk_size=10_000, seed=5)
    fit = (single.theta, single.summaries, single.s_obs, single.distances)
    np.testing.assert_allclose(adjust_by_mode(*fit), LLRegression().fit(*fit).predict(), atol=1e-12)


def test_a_one_dimensional_unimodal_sample_is_one_mode():
    """In 1-D the nearest draws lie on one side, so 10 neighbours split a Gaussian sample of 10^4 into large pieces
    (each then fitted alone: the adjusted mean 0.25 sd off, the variance 40 % too large)."""
    rng = np.random.default_rng(0)
    for n in (1_000, 10_000, 100_000):
        assert (modes(rng.normal(size=(n, 1))) == 0).all()
    # θ ~ N(0, 1), x ~ N(θ, 0.5²), x_obs = 0.8: the posterior is N(0.64, 0.2)
    result = rejection(lambda theta, rng: theta + 0.5 * rng.standard_normal(theta.shape),
                       Gaussian(np.zeros(1), np.eye(1)), np.array([0.8]), 20_000, quantile=0.5, seed=1)
    adjusted = adjust_by_mode(result.theta, result.summaries, result.s_obs, result.distances)
    assert abs(adjusted.mean() - 0.64) < 0.05 and abs(adjusted.var() / 0.2 - 1) < 0.1
    few = rejection(simulate, PRIOR, X_OBS, 100, quantile=0.05, seed=2)  # 5 draws: one mode, no neighbour graph
    assert adjust_by_mode(few.theta, few.summaries, few.s_obs, few.distances).shape == few.theta.shape


def test_one_sided_bounds_keep_a_margin_of_the_draws_scale():
    """A lone bound kept θ 1e-10 away in absolute terms: parameters of size 1e-11 all became 1e-10 (the fit lost
    them), and 1e-10 above a bound of 3e6 rounded back onto it (log 0: every adjusted θ NaN). The margin is 1e-10 of
    the draws' largest distance from the bound, and at least a few spacings of the bound."""
    rng = np.random.default_rng(0)
    theta = rng.uniform(1e-12, 5e-11, size=(1000, 1))
    s = np.log(theta) + 0.1 * rng.normal(size=(1000, 1))
    s_obs = np.array([np.log(2e-11)])
    distances = np.abs(s - s_obs)[:, 0]
    regression = LLRegression(low=[0.0], high=[np.inf]).fit(theta, s, s_obs, distances)
    assert abs(regression.coef_[1, 0] - 1.0) < 0.05  # log θ against log θ + noise
    adjusted = regression.predict()
    assert 1e-11 < np.median(adjusted) < 3e-11 and len(np.unique(adjusted)) == len(adjusted)
    theta = 3e6 + rng.exponential(1.0, size=(300, 1))
    theta[0] = 3e6  # on the bound
    s = theta - 3e6 + 0.1 * rng.normal(size=(300, 1))
    adjusted = LLRegression(low=[3e6], high=[np.inf]).fit(theta, s, np.array([1.0]), np.abs(s[:, 0] - 1.0)).predict()
    assert np.isfinite(adjusted).all() and (adjusted >= 3e6).all()


def test_adjust_by_mode_with_exact_matches():
    """Every accepted distance 0 (discrete summaries matched exactly): θ comes back unchanged, as from
    LLRegression (adjust_by_mode passed a bandwidth of 0 and raised)."""
    theta = np.random.default_rng(0).normal(size=(200, 1))
    adjusted = adjust_by_mode(theta, np.zeros((200, 1)), np.zeros(1), np.zeros(200))
    np.testing.assert_allclose(adjusted, theta)
