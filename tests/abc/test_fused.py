"""The fused Numba path for tasks: its simulators match the torch simulators in distribution, it keeps the exact
top-k of its own simulations, its accepted samples match the general path's statistically, it is reproducible
for a seed whatever the threads or chunk grouping, and it is chosen only where it applies."""

import math

import numba
import numpy as np
import pytest
import torch

from fastflow.abc import rejection
from fastflow.abc._fused import FusedSimulator
from fastflow.metrics import c2st
from fastflow.priors import BoxUniform
from fastflow.tasks import TASKS, Task, get_task
from fastflow.tasks.numba_simulator import NumbaSimulator, normal, uniform


def _numba_draws(task: Task, theta: torch.Tensor, key: int = 11) -> np.ndarray:
    """`(n, dim_x)` simulations of the task's Numba simulator at the given `(n, dim_theta)` θ."""
    simulate, _ = task.numba_simulator.compiled()
    theta = np.ascontiguousarray(theta.double().numpy())
    x = np.empty((theta.shape[0], task.dim_x))
    simulate(theta, key, 0, task.numba_simulator.draws, x)
    return x


@pytest.mark.parametrize("name", TASKS)
def test_numba_simulator_matches_the_torch_simulator_in_distribution(name):
    task = get_task(name)
    n = 40_000
    for i in (1, 2):  # two parameter points, each repeated n times
        theta = task.true_parameters(i).double().expand(n, -1).contiguous()
        reference = task.simulate(theta, generator=torch.Generator().manual_seed(i)).numpy()
        for x, y in ((_numba_draws(task, theta, key=i), reference), (task.summary(torch.from_numpy(_numba_draws(
                task, theta, key=i + 7))).numpy(), task.summary(torch.from_numpy(reference)).numpy())):
            se = np.sqrt(x.var(0) / n + y.var(0) / n)
            assert np.all(np.abs(x.mean(0) - y.mean(0)) < 5 * se + 1e-12), name
            se_var = np.sqrt(sum((((z - z.mean(0)) ** 4).mean(0) - z.var(0) ** 2) / n for z in (x, y)))
            assert np.all(np.abs(x.var(0) - y.var(0)) < 5 * se_var + 1e-12), name
            for q in (0.1, 0.5, 0.9):  # a quantile's standard error is below 0.01 standard deviations here
                assert np.all(np.abs(np.quantile(x, q, axis=0) - np.quantile(y, q, axis=0)) <= 0.05 * y.std(0) + 1e-12)


def test_numba_summary_equals_the_torch_summary():
    task = get_task("slcp")
    x = task.simulate(task.prior.sample(1_000, generator=torch.Generator().manual_seed(0)).double())
    _, summary = task.numba_simulator.compiled()
    s = np.empty((1_000, 5))
    summary(np.ascontiguousarray(x.numpy()), s)
    np.testing.assert_allclose(s, task.summary(x).numpy(), rtol=1e-10, atol=1e-12)


def test_fused_prior_draws_follow_the_prior():
    """Mean and covariance of 10^5 fused draws against the prior's own, within 5 standard errors (mean: √(var / n);
    covariance entries: var √(2 / n), the diagonal's, the larger)."""
    n = 100_000
    for name in ("gaussian_linear", "two_moons"):  # a Gaussian and a box prior
        task = get_task(name)
        fused = FusedSimulator.build(task, task.prior, None)
        theta, _ = fused.rows(5, np.arange(n))
        if name == "gaussian_linear":
            mean, covariance = task.prior.loc.double().numpy(), task.prior.covariance.double().numpy()
        else:
            low, high = task.prior.low.double().numpy(), task.prior.high.double().numpy()
            mean, covariance = (low + high) / 2, np.diag((high - low) ** 2 / 12)
        variance = np.diag(covariance).max()
        np.testing.assert_allclose(theta.mean(0), mean, atol=5 * math.sqrt(variance / n))
        np.testing.assert_allclose(np.cov(theta.T), covariance, atol=5 * variance * math.sqrt(2 / n))
        assert task.prior.in_support(torch.from_numpy(theta)).all()


def test_fused_top_k_is_the_exact_top_k_of_its_simulations():
    task = get_task("slcp")
    kwargs = dict(summary=task.summary, chunk_size=1_700, seed=4)
    everything = rejection(task, task.prior, task.observation(3), 6_000, quantile=1.0, **kwargs)
    best = rejection(task, task.prior, task.observation(3), 6_000, quantile=0.02, **kwargs)
    assert everything.fused and best.fused and best.num_accepted == 120
    np.testing.assert_array_equal(np.sort(everything.index), np.arange(6_000))
    np.testing.assert_array_equal(best.index, everything.index[:120])
    np.testing.assert_array_equal(best.theta, everything.theta[:120])
    # the replayed summaries give the kernel's distances
    scaled = (best.summaries - best.s_obs) * best.weight
    np.testing.assert_allclose(best.distances, np.linalg.norm(scaled, axis=1), rtol=1e-12)
    eps = float(np.quantile(everything.distances, 0.05))
    within = rejection(task, task.prior, task.observation(3), 6_000, eps=eps, **kwargs)
    np.testing.assert_array_equal(within.index, everything.index[everything.distances <= eps])


@pytest.mark.parametrize("distance", ["l1", "mahalanobis"])
def test_fused_distances_are_the_general_kernels_distances(distance):
    task = get_task("gaussian_mixture")
    result = rejection(task, task.prior, task.observation(1), 20_000, quantile=0.01, distance=distance,
                       chunk_size=7_000)
    diff = result.summaries - result.s_obs
    if distance == "l1":
        expected = np.abs(diff * result.weight).sum(1)
    else:
        expected = np.linalg.norm(diff @ result.weight.T, axis=1)
    assert result.fused
    np.testing.assert_allclose(result.distances, expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["two_moons", "slcp"])
def test_fused_and_general_paths_accept_statistically_the_same_samples(name):
    task = get_task(name)
    summary = task.summary if task.summary_fn is not None else None
    runs = [rejection(task, task.prior, task.observation(1), 300_000, quantile=0.01, summary=summary,
                      chunk_size=100_000, seed=7, fused=fused) for fused in (True, False)]
    assert runs[0].fused and not runs[1].fused
    fused, general = runs
    assert abs(fused.tolerance / general.tolerance - 1) < 0.05
    np.testing.assert_allclose(fused.weight, general.weight, rtol=0.02)
    se = np.sqrt(fused.theta.var(0) / 3_000 + general.theta.var(0) / 3_000)
    assert np.all(np.abs(fused.theta.mean(0) - general.theta.mean(0)) < 5 * se)
    np.testing.assert_allclose(fused.theta.std(0), general.theta.std(0), rtol=0.06)
    if name == "two_moons":  # C2ST of 3000 against 3000 draws: chance level
        assert c2st(general.theta, fused.theta) < 0.55


def test_fused_runs_are_reproducible_and_independent_of_threads_and_chunk_grouping():
    task = get_task("two_moons")
    x_obs = task.observation(2)
    run = rejection(task, task.prior, x_obs, 50_000, quantile=0.01, chunk_size=8_000, seed=3)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        single = rejection(task, task.prior, x_obs, 50_000, quantile=0.01, chunk_size=8_000, seed=3)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(run.index, single.index)
    np.testing.assert_array_equal(run.theta, single.theta)
    other = rejection(task, task.prior, x_obs, 50_000, quantile=0.01, chunk_size=8_000, seed=4)
    assert not np.array_equal(run.index, other.index)


def test_fused_path_is_chosen_only_where_it_applies():
    task = get_task("slcp")
    x_obs = task.observation(1)
    assert rejection(task, task.prior, x_obs, 2_000, quantile=0.1).fused  # raw x
    assert rejection(task, task.prior, x_obs, 2_000, quantile=0.1, summary=task.summary).fused
    custom = rejection(task, task.prior, x_obs, 2_000, quantile=0.1, summary=lambda x: x[:, :3])
    numpy_backend = rejection(task, task.prior, x_obs, 2_000, quantile=0.1, backend="numpy")
    assert not custom.fused and not numpy_backend.fused
    with pytest.raises(ValueError, match="summary is not the task's own"):
        rejection(task, task.prior, x_obs, 2_000, quantile=0.1, summary=lambda x: x, fused=True)
    with pytest.raises(ValueError, match="not a task with a numba_simulator"):
        rejection(lambda theta, rng: theta, BoxUniform(-np.ones(2), np.ones(2)), np.zeros(2), 100, quantile=0.1,
                  fused=True)


def _flaky_row(theta, x, i, key, counter):
    """x = θ + N(0, 0.1²), NaN in the first coordinate with probability 0.1."""
    for j in range(theta.shape[1]):
        x[i, j] = theta[i, j] + 0.1 * normal(key, counter + 2 * j)
    if uniform(key, counter + 2 * theta.shape[1]) < 0.1:
        x[i, 0] = np.nan


def test_a_user_task_with_a_numba_simulator_runs_fused_and_drops_nan():
    two_moons = get_task("two_moons")
    task = Task(name="flaky", prior=BoxUniform(-np.ones(2), np.ones(2)), dim_x=2,
                observation_seeds=two_moons.observation_seeds, simulator_fn=two_moons.simulator_fn,
                log_likelihood_fn=two_moons.log_likelihood_fn, reference_fn=two_moons.reference_fn,
                numba_simulator=NumbaSimulator(_flaky_row, draws=5))
    result = rejection(task, task.prior, np.array([0.3, -0.2]), 100_000, quantile=0.01, chunk_size=30_000)
    assert result.fused and result.num_accepted == 1_000
    assert abs(result.num_dropped - 10_000) < 5 * math.sqrt(100_000 * 0.09)
    assert np.isfinite(result.summaries).all()
    np.testing.assert_allclose(result.theta.mean(0), [0.3, -0.2], atol=0.02)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x_obs=np.zeros(3)), "length 3"),
        (dict(x_obs=np.array([np.nan, 0.0])), "NaN"),
        (dict(quantile=0.0), "quantile"),
        (dict(quantile=1.01), "quantile"),
        (dict(quantile=None, eps=1e-12), "no simulation accepted"),
    ],
)
def test_fused_bad_input_is_refused(kwargs, message):
    task = get_task("two_moons")
    arguments = dict(x_obs=task.observation(1), quantile=0.1)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        rejection(task, task.prior, arguments.pop("x_obs"), 5_000, chunk_size=2_000, fused=True, **arguments)


@numba.njit
def _draw_normals(n, key):
    out = np.empty((n, 2))
    for i in range(n):
        out[i, 0], out[i, 1] = normal(key, 2 * i), uniform(key, 2 * i + 1)
    return out


def test_counter_based_normal_and_uniform_have_their_distributions():
    from scipy import stats

    draws = _draw_normals(1_000_000, 123)
    z, u = draws[:, 0], draws[:, 1]
    assert stats.kstest(z, "norm").pvalue > 1e-3 and stats.kstest(u, "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(z, u)[0, 1]) < 5e-3 and abs(np.corrcoef(z[1:], z[:-1])[0, 1]) < 5e-3
    for t in (2.0, 3.0, 3.5, 4.0):  # the ziggurat's wedges and its tail beyond r = 3.44
        expected = 2 * stats.norm.sf(t)
        assert abs((np.abs(z) > t).mean() - expected) < 5 * math.sqrt(expected / 1_000_000)
    assert 0 < u.min() and u.max() < 1


def test_a_whole_chunk_equals_its_replayed_rows():
    task = get_task("slcp")
    for summary in (None, task.summary):
        fused = FusedSimulator.build(task, task.prior, summary)
        theta, s = fused.chunk(9, 1_000)
        rows = np.array([0, 5, 127, 128, 999])
        replayed = fused.rows(9, rows)
        np.testing.assert_array_equal(replayed[0], theta[rows])
        np.testing.assert_array_equal(replayed[1], s[rows])
        assert s.shape == (1_000, 5 if summary else 8)
