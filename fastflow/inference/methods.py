"""Inference methods by name, each turning (task, x_obs, budget) into posterior samples; the CLI's `--method`."""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from fastflow._checks import positive_int, real_tensor
from fastflow.inference.fmpe import FMPE
from fastflow.inference.npe import NPE
from fastflow.inference.posterior import Posterior
from fastflow.inference.simulate import simulate

__all__ = ["METHODS", "posterior_samples", "train_npe"]


class _Task(Protocol):
    prior: object
    dim_x: int

    def simulate(self, theta: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor: ...


def train_npe(task: _Task, *, num_simulations: int, seed: int = 0, progress: bool = True) -> Posterior:
    """Simulate `num_simulations` pairs from `task` and train NPE with the package defaults."""
    simulations = simulate(task.simulate, task.prior, num_simulations, seed=seed)
    return NPE(task.prior, seed=seed, progress=progress).fit(simulations.theta, simulations.x)


def _npe_samples(task, x_obs, *, num_simulations, num_samples, seed, progress):
    posterior = train_npe(task, num_simulations=num_simulations, seed=seed, progress=progress)
    torch.manual_seed(seed)
    return posterior.sample(num_samples, x_obs)


def _fmpe_samples(task, x_obs, *, num_simulations, num_samples, seed, progress):
    simulations = simulate(task.simulate, task.prior, num_simulations, seed=seed)
    posterior = FMPE(task.prior, seed=seed, progress=progress).fit(simulations.theta, simulations.x)
    torch.manual_seed(seed)
    return posterior.sample(num_samples, x_obs)


def _abc_samples(task, x_obs, *, num_simulations, num_samples, seed, progress, adjust=True):
    from fastflow.abc import abc_posterior_samples

    return abc_posterior_samples(task, x_obs, num_simulations=num_simulations, num_samples=num_samples, seed=seed,
                                 adjust=adjust)


def _abc_rejection_samples(task, x_obs, *, num_simulations, num_samples, seed, progress):
    return _abc_samples(task, x_obs, num_simulations=num_simulations, num_samples=num_samples, seed=seed,
                        progress=progress, adjust=False)


# "abc": rejection + local-linear regression adjustment; "abc-rejection": plain rejection (CLI `--no-adjust`)
METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "npe": _npe_samples, "fmpe": _fmpe_samples, "abc": _abc_samples, "abc-rejection": _abc_rejection_samples,
}


def posterior_samples(
    task: _Task, method: str, x_obs: torch.Tensor, *, num_simulations: int, num_samples: int, seed: int = 0, progress: bool = True
) -> torch.Tensor:
    """`(num_samples, dim_theta)` posterior draws for one observation `x_obs (dim_x,)` by `method`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    x_obs = real_tensor(x_obs, "x_obs").to(torch.float32)  # (a complex x_obs lost its imaginary part)
    if x_obs.shape != (task.dim_x,):
        raise ValueError(f"x_obs must be a 1-D array of length {task.dim_x} for this task, got shape {tuple(x_obs.shape)}")
    if not torch.isfinite(x_obs).all():
        raise ValueError("x_obs contains NaN or inf")
    num_samples = positive_int(num_samples, "num_samples")
    return METHODS[method](task, x_obs, num_simulations=num_simulations, num_samples=num_samples, seed=seed, progress=progress)
