"""The `Task` record: prior, batched simulator, observations, likelihood and reference posterior of a benchmark."""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from fastflow._checks import check_seed, floating_tensor, positive_int, real_tensor
from fastflow.priors import Prior
from fastflow.tasks.numba_simulator import NumbaSimulator

__all__ = ["Task", "rejection_batches"]

NUM_OBSERVATIONS = 10


@dataclass(frozen=True, eq=False)
class Task:
    """A simulation-based-inference benchmark task (sbibm definitions, Lueckmann et al. 2021).

    The public methods validate their input and call the unchecked implementations held in the
    `*_fn` fields, so a task is assembled by composition rather than subclassing.

    Attributes:
        name: registry name, e.g. `"two_moons"`.
        prior: the prior p(θ) over `(dim_theta,)` parameters.
        dim_x: length of one simulated data vector.
        observation_seeds: the 10 seeds that generate observations 1..10.
        simulator_fn: `(theta (n, dim_theta), generator) -> x (n, dim_x)`, unchecked.
        log_likelihood_fn: `(theta (n, dim_theta), x (n, dim_x)) -> (n,)`, unchecked.
        reference_fn: `(x_obs (dim_x,) float64, n, generator) -> (n, dim_theta)`, unchecked.
        moments_fn: `x_obs (dim_x,) float64 -> (mean (dim_theta,), covariance (dim_theta, dim_theta))`,
            or None where the posterior moments have no closed form.
        summary_fn: `x (n, dim_x) -> s (n, dim_s)` default summary statistics for distance-based methods
            (ABC), or None where x itself serves.
        numba_simulator: the same simulator (and summary_fn) one row at a time in Numba, which the fused
            ABC kernel runs (`fastflow.abc.rejection` picks it for the task), or None.

    References:
        Lueckmann et al. (2021), "Benchmarking simulation-based inference", AISTATS.
    """

    name: str
    prior: Prior
    dim_x: int
    observation_seeds: tuple[int, ...]
    simulator_fn: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
    log_likelihood_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    reference_fn: Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]
    moments_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    summary_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    numba_simulator: NumbaSimulator | None = None

    def __post_init__(self):
        if len(self.observation_seeds) != NUM_OBSERVATIONS:
            raise ValueError(f"a task needs {NUM_OBSERVATIONS} observation seeds, got {len(self.observation_seeds)}")
        if self.numba_simulator is not None and (self.numba_simulator.summary is None) != (self.summary_fn is None):
            raise ValueError("numba_simulator must carry a summary exactly when the task has a summary_fn")

    @property
    def dim_theta(self) -> int:
        """Number of parameters."""
        return self.prior.dim

    def simulate(self, theta: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Run the simulator once per parameter vector.

        Arguments:
            theta: `(n, dim_theta)` parameters.
            generator: source of randomness; its device must be θ's device.

        Returns:
            `(n, dim_x)` simulated data in θ's floating dtype (float32 for half precisions and integers).
        """
        theta = self._check_theta(theta)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator is not None and generator.device != theta.device:
            raise ValueError(f"generator is on {generator.device} but θ is on {theta.device}")
        return self.simulator_fn(theta, generator)

    def summary(self, x: torch.Tensor) -> torch.Tensor:
        """Default summary statistics of simulated or observed data, for distance-based methods (ABC).

        Arguments:
            x: `(n, dim_x)` data.

        Returns:
            `(n, dim_s)` summaries in x's dtype: `summary_fn(x)`, or x itself where the task has none.
        """
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.dim_x:
            raise ValueError(f"x must have shape (n, {self.dim_x}) for {self.name}, got {tuple(x.shape)}")
        return x if self.summary_fn is None else self.summary_fn(x)

    def log_likelihood(self, theta: torch.Tensor, x_obs: torch.Tensor) -> torch.Tensor:
        """Exact log-likelihood log p(x | θ).

        Arguments:
            theta: `(n, dim_theta)` parameters.
            x_obs: `(dim_x,)` one observation shared by all θ, or `(n, dim_x)` one per θ.

        Returns:
            `(n,)` log-densities in θ's floating dtype, `-inf` where x is impossible under θ.
        """
        theta = self._check_theta(theta)
        x = real_tensor(x_obs, "x_obs").to(theta.device, theta.dtype)
        if x.shape == (self.dim_x,):
            x = x.expand(theta.shape[0], self.dim_x)
        elif x.shape != (theta.shape[0], self.dim_x):
            raise ValueError(
                f"x_obs must have shape ({self.dim_x},) or ({theta.shape[0]}, {self.dim_x}) for {self.name}, "
                f"got {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("x_obs contains NaN or inf")
        return self.log_likelihood_fn(theta, x)

    def observation(self, i: int) -> torch.Tensor:
        """Observation number `i` in 1..10, `(dim_x,)` float32, drawn from the prior and simulator with
        the task's i-th observation seed (same seeds as sbibm, different random streams)."""
        return _observation(self, self._check_index(i))[1].clone()

    def true_parameters(self, i: int) -> torch.Tensor:
        """The `(dim_theta,)` float32 parameters that generated observation `i` in 1..10."""
        return _observation(self, self._check_index(i))[0].clone()

    def reference_posterior_samples(self, x_obs: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
        """Samples from the reference posterior p(θ | x_obs), cached in memory per (task, x_obs, n, seed).

        Arguments:
            x_obs: `(dim_x,)` observation, e.g. `task.observation(1)`.
            n: number of samples, positive.
            seed: seed of the torch.Generator that drives the sampler.

        Returns:
            `(n, dim_theta)` float32 samples.
        """
        x = self._check_x_obs(x_obs)
        n = positive_int(n, "n")
        return _reference(self, tuple(x.tolist()), n, check_seed(seed)).clone()

    def reference_posterior_moments(self, x_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Analytic posterior mean `(dim_theta,)` and covariance `(dim_theta, dim_theta)`, float64.

        Raises:
            ValueError: the task has no closed-form posterior moments.
        """
        if self.moments_fn is None:
            raise ValueError(f"task {self.name!r} has no closed-form posterior moments")
        return self.moments_fn(self._check_x_obs(x_obs))

    def _check_theta(self, theta: torch.Tensor) -> torch.Tensor:
        theta = floating_tensor(theta, "θ")  # (half precisions: gaussian_mixture's noise came back float32)
        if theta.ndim != 2 or theta.shape[1] != self.dim_theta:
            raise ValueError(f"θ must have shape (n, {self.dim_theta}) for {self.name}, got {tuple(theta.shape)}")
        if not torch.isfinite(theta).all():
            raise ValueError("θ contains NaN or inf")
        return theta

    def _check_x_obs(self, x_obs: torch.Tensor) -> torch.Tensor:
        x = real_tensor(x_obs, "x_obs").detach().to("cpu", torch.float64)
        if x.shape != (self.dim_x,):
            raise ValueError(f"x_obs must have shape ({self.dim_x},) for {self.name}, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x_obs contains NaN or inf")
        return x

    def _check_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 1 <= i <= NUM_OBSERVATIONS:
            raise ValueError(f"observation index must be an int in 1..{NUM_OBSERVATIONS}, got {i!r}")
        return int(i)


@functools.lru_cache(maxsize=None)
def _observation(task: Task, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(task.observation_seeds[i - 1])
    theta = task.prior.sample(1, generator=generator)
    x = task.simulator_fn(theta, generator)
    return theta[0], x[0]


@functools.lru_cache(maxsize=64)
def _reference(task: Task, x_key: tuple[float, ...], n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.tensor(x_key, dtype=torch.float64)
    return task.reference_fn(x, n, generator).float()


def rejection_batches(propose: Callable[[int], torch.Tensor], n: int, *, max_rounds: int = 1000,
                      give_up_after: int = 10_000_000) -> torch.Tensor:
    """Collect `n` accepted rows from a vectorized proposer.

    Arguments:
        propose: `m -> (k, dim)` accepted rows out of `m` proposals (k ≤ m).
        n: number of rows wanted.
        give_up_after: proposals without a single acceptance after which it raises (an observation the
            model cannot produce would otherwise run all `max_rounds` rounds of millions of proposals).

    Returns:
        `(n, dim)` the first `n` accepted rows, in proposal order.
    """
    accepted, count, proposed, batch = [], 0, 0, max(1024, 2 * n)
    for _ in range(max_rounds):
        rows = propose(batch)
        accepted.append(rows)
        count += rows.shape[0]
        proposed += batch
        if count >= n:
            return torch.cat(accepted)[:n]
        if count == 0 and proposed >= give_up_after:
            raise RuntimeError(f"rejection sampler accepted none of {proposed} proposals: is the observation one "
                               "the simulator can produce?")
        rate = max(count, 1) / proposed
        batch = min(4_000_000, max(1024, math.ceil(1.2 * (n - count) / rate)))
    raise RuntimeError(f"rejection sampler accepted only {count} of {n} wanted rows in {max_rounds} rounds")
