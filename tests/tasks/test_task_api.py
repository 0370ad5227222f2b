"""Shared behaviour of every task: registry, shapes, seeding, observations, caching and bad input."""

import math

import numpy as np
import pytest
import torch

from fastflow.tasks import TASKS, Task, get_task
from fastflow.tasks.task import rejection_batches

DIMS = {"two_moons": (2, 2), "gaussian_linear": (10, 10), "gaussian_mixture": (2, 2), "slcp": (5, 8)}


def test_registry():
    assert TASKS == ("two_moons", "gaussian_linear", "gaussian_mixture", "slcp")
    for name in TASKS:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
        assert get_task(name) is task
    with pytest.raises(ValueError, match="known tasks: two_moons, gaussian_linear"):
        get_task("three_moons")
    with pytest.raises(ValueError, match="unknown task"):
        get_task(["slcp"])


@pytest.mark.parametrize("name", TASKS)
def test_simulate_shapes_and_seeding(name):
    task = get_task(name)
    assert (task.dim_theta, task.dim_x) == DIMS[name]
    theta = task.prior.sample(257, generator=torch.Generator().manual_seed(0))
    x1 = task.simulate(theta, generator=torch.Generator().manual_seed(3))
    x2 = task.simulate(theta, generator=torch.Generator().manual_seed(3))
    x3 = task.simulate(theta, generator=torch.Generator().manual_seed(4))
    assert x1.shape == (257, task.dim_x) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.isfinite(x1).all()
    x64 = task.simulate(theta.double(), generator=torch.Generator().manual_seed(3))
    assert x64.dtype == torch.float64 and x64.shape == x1.shape
    lp = task.log_likelihood(theta, x1)
    assert lp.shape == (257,) and torch.isfinite(lp).all()


@pytest.mark.parametrize("name", TASKS)
def test_observations(name):
    task = get_task(name)
    for i in (1, 10):
        x, theta = task.observation(i), task.true_parameters(i)
        assert x.shape == (task.dim_x,) and theta.shape == (task.dim_theta,)
        assert x.dtype == theta.dtype == torch.float32
        assert bool(task.prior.in_support(theta))
        assert torch.isfinite(task.log_likelihood(theta[None], x)).all()
        # deterministic: rebuilt from the same seed
        generator = torch.Generator().manual_seed(task.observation_seeds[i - 1])
        theta_again = task.prior.sample(1, generator=generator)
        assert torch.equal(theta_again[0], theta)
        assert torch.equal(task.simulate(theta_again, generator=generator)[0], x)
    # a caller mutating the result does not corrupt the cache
    task.observation(2).fill_(math.nan)
    assert torch.isfinite(task.observation(2)).all()
    assert not torch.equal(task.observation(1), task.observation(2))
    assert torch.equal(task.observation(np.int64(3)), task.observation(3))  # numpy integers count


@pytest.mark.parametrize("name", TASKS)
def test_reference_samples_shape_support_and_cache(name):
    task = get_task(name)
    x = task.observation(3)
    samples = task.reference_posterior_samples(x, 300, seed=5)
    assert samples.shape == (300, task.dim_theta) and samples.dtype == torch.float32
    assert task.prior.in_support(samples).all()
    assert torch.isfinite(task.log_likelihood(samples.double(), x)).all()
    again = task.reference_posterior_samples(x.double(), 300, seed=5)
    assert torch.equal(samples, again)
    assert not torch.equal(samples, task.reference_posterior_samples(x, 300, seed=6))


@pytest.mark.parametrize("name", TASKS)
def test_bad_input(name):
    task = get_task(name)
    d, c = task.dim_theta, task.dim_x
    x = task.observation(1)
    for theta in (torch.zeros(4, d + 1), torch.zeros(d), torch.zeros(2, 3, d)):
        with pytest.raises(ValueError, match="θ must have shape"):
            task.simulate(theta)
        with pytest.raises(ValueError, match="θ must have shape"):
            task.log_likelihood(theta, x)
    with pytest.raises(ValueError, match="NaN"):
        task.simulate(torch.full((2, d), math.nan))
    for bad_x in (torch.zeros(c + 1), torch.zeros(3, c), torch.zeros(1, c)):
        with pytest.raises(ValueError, match="x_obs must have shape"):
            task.log_likelihood(torch.zeros(2, d), bad_x)
    for bad_x in (torch.zeros(c + 1), torch.zeros(1, c)):
        with pytest.raises(ValueError, match="x_obs must have shape"):
            task.reference_posterior_samples(bad_x, 10)
    for value in (math.nan, math.inf):
        bad_x = x.clone()
        bad_x[0] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            task.reference_posterior_samples(bad_x, 10)
        with pytest.raises(ValueError, match="NaN or inf"):
            task.log_likelihood(torch.zeros(2, d), bad_x)
    for n in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive int"):
            task.reference_posterior_samples(x, n)
    for i in (0, 11, 1.0, True):
        with pytest.raises(ValueError, match="1..10"):
            task.observation(i)
        with pytest.raises(ValueError, match="1..10"):
            task.true_parameters(i)
    # complex numbers lost their imaginary parts; seeds -1 and 2**63 aliased others; a bad generator raised an
    # AttributeError
    with pytest.raises(TypeError, match="θ must be real"):
        task.simulate(torch.zeros(2, d, dtype=torch.complex64))
    with pytest.raises(TypeError, match="x_obs must be real"):
        task.log_likelihood(torch.zeros(2, d), x.to(torch.complex64))
    with pytest.raises(TypeError, match="x_obs must be real"):
        task.reference_posterior_samples(x.to(torch.complex64), 10)
    for seed in (-1, 2**63, 1.5):
        with pytest.raises(ValueError, match="seed"):
            task.reference_posterior_samples(x, 10, seed=seed)
    with pytest.raises(TypeError, match="torch.Generator"):
        task.simulate(torch.zeros(2, d), generator=0)


@pytest.mark.parametrize("name", TASKS)
def test_half_precision_and_numpy_seeds(name):
    task = get_task(name)
    theta = task.prior.sample(4, generator=torch.Generator().manual_seed(0))
    assert task.simulate(theta.half()).dtype == torch.float32  # (gaussian_mixture's came back float32, others' float16)
    x = task.observation(1)
    torch.testing.assert_close(task.reference_posterior_samples(x, 5, seed=np.int64(3)),
                               task.reference_posterior_samples(x, 5, seed=3))


def test_moments_only_where_closed_form():
    with pytest.raises(ValueError, match="no closed-form posterior moments"):
        get_task("slcp").reference_posterior_moments(get_task("slcp").observation(1))


def test_rejection_sampling_gives_up_when_nothing_is_accepted():
    """An observation the simulator cannot produce (two_moons at x = (5, 5)) accepts nothing: it raises after
    `give_up_after` proposals instead of running a thousand rounds of millions."""
    with pytest.raises(RuntimeError, match="accepted none of"):
        rejection_batches(lambda m: torch.empty(0, 2), 10, give_up_after=10_000)
    rows = rejection_batches(lambda m: torch.ones(m // 1000, 2), 10, give_up_after=10_000)  # rare but possible
    assert rows.shape == (10, 2)
