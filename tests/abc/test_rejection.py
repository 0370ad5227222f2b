"""Rejection ABC: backends agree exactly, the streaming top-k is the exact top-k, posterior moments, bad input."""

import importlib

import numpy as np
import pytest
import torch

from fastflow.abc import rejection
from fastflow.priors import BoxUniform
from fastflow.tasks import get_task
from abc_conjugate import PRIOR, X_OBS, posterior_moments, simulate


@pytest.mark.parametrize("distance", ["euclidean", "l1", "mahalanobis"])
def test_numba_and_numpy_backends_accept_the_same_simulations(distance):
    runs = [rejection(simulate, PRIOR, X_OBS, 20_000, quantile=0.01, distance=distance, chunk_size=3_000,
                      seed=3, backend=backend) for backend in ("numba", "numpy")]
    np.testing.assert_array_equal(runs[0].index, runs[1].index)
    np.testing.assert_allclose(runs[0].distances, runs[1].distances, rtol=1e-12)
    np.testing.assert_array_equal(runs[0].theta, runs[1].theta)
    assert runs[0].num_accepted == 200 and runs[0].tolerance == runs[0].distances[-1]


@pytest.mark.parametrize("distance", ["euclidean", "l1", "mahalanobis"])
def test_backends_break_ties_of_discrete_summaries_alike(distance):
    """9 count summaries: rows equal up to a permutation of their coordinates tie; numpy's pairwise sums made their
    distances differ in the last bit, so the backends kept different rows at the threshold. Bit-identical now."""
    prior = BoxUniform(torch.zeros(9), torch.ones(9))
    scales = np.array([1.3, 0.7, 0.7, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])

    def counts(theta, rng):
        return rng.integers(0, 3, size=theta.shape) * scales

    runs = [rejection(counts, prior, np.full(9, 0.7), 20_000, quantile=0.01, distance=distance,
                      scale=None if distance != "mahalanobis" else "mad", seed=5, backend=backend)
            for backend in ("numba", "numpy")]
    np.testing.assert_array_equal(runs[0].index, runs[1].index)
    np.testing.assert_array_equal(runs[0].distances, runs[1].distances)


def test_an_observation_with_negative_strides():
    """A reversed numpy array (x[::-1]) was refused by torch.as_tensor."""
    reversed_obs = np.ascontiguousarray(np.asarray(X_OBS, dtype=np.float64)[::-1])[::-1]
    expected = rejection(simulate, PRIOR, np.asarray(X_OBS, dtype=np.float64), 2_000, quantile=0.05, seed=1)
    np.testing.assert_array_equal(rejection(simulate, PRIOR, reversed_obs, 2_000, quantile=0.05, seed=1).index,
                                  expected.index)


def test_streaming_top_k_equals_the_top_k_of_all_simulations():
    everything = rejection(simulate, PRIOR, X_OBS, 5_000, quantile=1.0, chunk_size=700, seed=1)
    best = rejection(simulate, PRIOR, X_OBS, 5_000, quantile=0.03, chunk_size=700, seed=1)
    assert everything.num_accepted == 5_000 and best.num_accepted == 150
    np.testing.assert_array_equal(np.sort(everything.index), np.arange(5_000))
    np.testing.assert_array_equal(best.index, everything.index[:150])
    np.testing.assert_array_equal(best.theta, everything.theta[:150])
    assert np.all(np.diff(best.distances) >= 0)
    # distances are MAD-scaled euclidean distances of the summaries
    scaled = (best.summaries - best.s_obs) * best.weight
    np.testing.assert_allclose(best.distances, np.linalg.norm(scaled, axis=1), rtol=1e-12)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("chunk_size", [800, 120])
def test_mad_scale_comes_from_the_first_pilot_size_simulations(monkeypatch, fused, chunk_size):
    """Within chunk 0, or over the first chunks when they are smaller (the pilot was chunk 0's 120 rows)."""
    monkeypatch.setattr(importlib.import_module("fastflow.abc.rejection"), "PILOT_SIZE", 300)
    task = get_task("two_moons")
    result = rejection(task, task.prior, task.observation(1), 1_000, quantile=1.0, chunk_size=chunk_size, seed=3,
                       fused=fused)
    assert result.fused == fused
    np.testing.assert_array_equal(np.sort(result.index), np.arange(1_000))
    pilot = result.summaries[np.argsort(result.index)][:300]
    mad = 1.4826 * np.median(np.abs(pilot - np.median(pilot, axis=0)), axis=0)
    np.testing.assert_allclose(result.weight, 1 / mad, rtol=1e-12)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_a_simulator_changing_theta_in_place_keeps_the_drawn_parameters(framework):
    """A simulator that overwrites θ (here: with zeros, after using it) returned those zeros as accepted θ."""
    def overwrite(theta, rng):
        x = theta + 0.0
        theta[:] = 0.0
        return x

    result = rejection(overwrite, PRIOR, X_OBS, 2_000, quantile=1.0, chunk_size=700, seed=4, framework=framework)
    np.testing.assert_array_equal(result.theta, result.summaries)


def test_eps_accepts_exactly_the_simulations_within_eps():
    everything = rejection(simulate, PRIOR, X_OBS, 4_000, quantile=1.0, chunk_size=1_000, seed=2)
    eps = float(np.quantile(everything.distances, 0.1))
    within = rejection(simulate, PRIOR, X_OBS, 4_000, eps=eps, chunk_size=1_000, seed=2)
    np.testing.assert_array_equal(within.index, everything.index[everything.distances <= eps])
    assert within.tolerance == eps


def test_conjugate_gaussian_rejection_moments_approach_the_posterior():
    result = rejection(simulate, PRIOR, X_OBS, 200_000, quantile=0.01, chunk_size=50_000, seed=0)
    mean, var = posterior_moments(X_OBS)
    # a small tolerance: moments within a few standard errors plus the O(h²) bias
    se_mean = np.sqrt(var / result.num_accepted)
    assert np.all(np.abs(result.theta.mean(0) - mean) < 5 * se_mean + 0.02)
    assert np.all(np.abs(result.theta.var(0) / var - 1) < 0.12)


def test_nan_simulations_are_dropped_and_counted():
    def flaky(theta, rng):
        x = simulate(theta, rng)
        x[::10, 0] = np.nan
        return x

    result = rejection(flaky, PRIOR, X_OBS, 10_000, quantile=0.05, chunk_size=2_500, seed=0)
    assert result.num_dropped == 1_000 and result.num_accepted == 500
    assert np.isfinite(result.distances).all() and np.all(result.index % 10 != 0)
    # fewer finite simulations than the quantile asks for: all of them, and a warning (it was silent)
    with pytest.warns(RuntimeWarning, match="accepted 9000 simulations, not 9500: 1000 of 10000 were dropped"):
        result = rejection(flaky, PRIOR, X_OBS, 10_000, quantile=0.95, chunk_size=2_500, seed=0)
    assert result.num_accepted == 9_000


def test_torch_simulator_and_task_give_posterior_draws_inside_the_prior():
    task = get_task("two_moons")

    def torch_simulator(theta, generator):
        return task.simulate(theta, generator=generator)

    from_task = rejection(task, task.prior, task.observation(1), 50_000, quantile=0.01, chunk_size=20_000,
                          fused=False)
    from_fn = rejection(torch_simulator, task.prior, task.observation(1), 50_000, quantile=0.01,
                        chunk_size=20_000, framework="torch")
    np.testing.assert_array_equal(from_task.theta, from_fn.theta)
    assert not from_task.fused and not from_fn.fused
    assert from_task.theta.shape == (500, 2) and (np.abs(from_task.theta) <= 1).all()


def test_task_summary_statistics_are_used():
    task = get_task("slcp")
    result = rejection(task, task.prior, task.observation(1), 5_000, quantile=0.01, summary=task.summary,
                       chunk_size=5_000)
    assert result.summaries.shape == (50, 5) and result.s_obs.shape == (5,)
    s_obs = np.asarray(task.summary(task.observation(1).double().unsqueeze(0)), dtype=np.float64)[0]
    np.testing.assert_allclose(result.s_obs, s_obs, rtol=1e-12)
    # the distances are the weighted norms of the accepted summaries against those of the observation
    np.testing.assert_allclose(result.distances, np.sqrt((((result.summaries - s_obs) * result.weight) ** 2).sum(1)),
                               rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x_obs=np.zeros(3)), "length 3"),
        (dict(x_obs=np.array([np.nan, 0.0])), "NaN"),
        (dict(quantile=0.0), "quantile"),
        (dict(quantile=1.5), "quantile"),
        (dict(quantile=True), "quantile"),  # (accepted every simulation)
        (dict(quantile=None, eps=True), "eps"),
        (dict(quantile=None), "quantile, eps"),
        (dict(quantile=None, eps=-1.0), "eps"),
        (dict(quantile=None, eps=1e-9), "no simulation accepted"),
        (dict(n_sims=0), "n_sims"),
        (dict(chunk_size=-5), "chunk_size"),
        (dict(distance="cosine"), "unknown distance"),
        (dict(backend="cuda"), "unknown backend"),
        (dict(scale=np.array([1.0, -1.0])), "scale"),
        (dict(scale="MAD"), "scale must be 'mad'"),
        (dict(seed=1.5), "seed"),
        (dict(seed=-1), "seed"),
        (dict(simulator=lambda theta, rng: simulate(theta, rng)[:-1]), "n = 1000 rows"),
        (dict(simulator=lambda theta, rng: simulate(theta, rng)[:, 0]), r"shape \(1000,\)"),
        (dict(simulator=lambda theta, generator: torch.cat((theta, theta)), framework="torch"), "n = 1000 rows"),
        (dict(summary=lambda x: x[:-1]), "summary must map"),
        (dict(simulator=lambda theta, rng: np.full_like(theta, np.nan), scale=None), "no simulation accepted"),
        (dict(simulator=lambda theta, rng: np.full_like(theta, np.nan)), "fewer than 2 finite"),
        (dict(x_obs=np.array([0.0, np.inf])), "NaN or inf"),
        (dict(summary=lambda x: x - x[:, :1] * 0 + np.where(np.arange(2) == 0, np.nan, 0.0)), "x_obs contain NaN"),
    ],
)
def test_bad_input_is_refused(kwargs, message):
    arguments = dict(simulator=simulate, prior=PRIOR, x_obs=X_OBS, n_sims=1_000, quantile=0.1, chunk_size=1_000)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        rejection(arguments.pop("simulator"), arguments.pop("prior"), arguments.pop("x_obs"), arguments.pop("n_sims"),
                  **arguments)


def test_prior_and_simulator_types_are_checked():
    with pytest.raises(TypeError, match="Prior"):
        rejection(simulate, "normal", X_OBS, 100, quantile=0.1)
    with pytest.raises(ValueError, match="prior has dim"):
        rejection(get_task("two_moons"), BoxUniform(torch.zeros(3), torch.ones(3)), np.zeros(2), 100, quantile=0.1)


def test_chunks_of_a_run_draw_distinct_streams():
    """torch's CPU generator keeps 32 bits of a seed: chunks 50,699 and 55,170 of seed 0 had 63-bit keys equal in
    those bits and simulated the same θ and x (an exact duplicate at distance 0)."""
    import math

    from fastflow.abc.rejection import _Plan

    task = get_task("two_moons")
    plan = _Plan(task, task.prior, "torch", None, 55_171, 1, 0, None, None, "euclidean", "numba", None, math.inf)
    assert plan.key(50_699) % 2**32 == plan.key(55_170) % 2**32  # (the collision the keys alone gave)
    assert not np.array_equal(plan.draw(50_699)[0], plan.draw(55_170)[0])
    assert len({plan.torch_seed(chunk) for chunk in range(0, 55_171, 7)}) == len(range(0, 55_171, 7))
