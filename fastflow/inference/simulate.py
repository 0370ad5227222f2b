"""Simulate training pairs (θ, x) from a prior and a batched simulator, dropping failed simulations."""

from __future__ import annotations

import inspect
import random
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fastflow._checks import check_seed, positive_int, real_tensor
from fastflow.priors import Prior, check_prior

__all__ = ["Simulations", "simulate", "simulator_seed"]


@dataclass
class Simulations:
    """Training pairs `theta (N, D)`, `x (N, C)`, and how many NaN/inf simulations were dropped."""

    theta: torch.Tensor
    x: torch.Tensor
    num_dropped: int


def _accepts_generator(simulator: Callable) -> bool:
    try:
        return "generator" in inspect.signature(simulator).parameters
    except (TypeError, ValueError):
        return False


def simulator_seed(seed: int) -> int:
    """The global RNG's seed for a simulator without a `generator` keyword: a hash of `seed` (numpy's SeedSequence),
    so that its stream is independent of the prior's generator, seeded with `seed`."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _seed_global_rngs(seed: int) -> None:
    """Seed torch's, numpy's and Python's global random number generators (a simulator may draw from any)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def simulate(
    simulator: Callable[..., torch.Tensor],
    prior: Prior,
    num_simulations: int,
    *,
    seed: int = 0,
    batch_size: int = 100_000,
) -> Simulations:
    """Draw θ ~ prior and x ~ simulator(θ) in batches.

    Arguments:
        simulator: maps θ `(n, D)` to x `(n, C)`; when it takes a `generator` keyword (as the package's
            tasks do) it gets the prior's seeded `torch.Generator`, otherwise the global RNGs of torch, numpy and
            Python's `random` are seeded with `simulator_seed(seed)` (a stream independent of the prior's; as sbi's
            `simulate_for_sbi(seed=...)`).
        num_simulations: N > 0.
        seed: an int >= 0; the same seed and batch_size give the same simulations (a simulator taking the
            generator draws from it between the batches' θ draws, so another batch_size gives other θ too).
        batch_size: simulations per simulator call.

    Returns:
        `Simulations` without the rows whose x has a NaN or inf (a warning gives their count).
    """
    check_prior(prior)
    num_simulations, batch_size = positive_int(num_simulations, "num_simulations"), positive_int(batch_size, "batch_size")
    seed = check_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    takes_generator = _accepts_generator(simulator)
    if not takes_generator:
        # a stream of its own: seeded with `seed` too, the simulator's noise would repeat the prior's draws
        _seed_global_rngs(simulator_seed(seed))
    thetas, xs = [], []
    for start in range(0, num_simulations, batch_size):
        count = min(batch_size, num_simulations - start)
        theta = prior.sample(count, generator=generator)
        given = theta.clone()  # the simulator's own copy: one that changes θ in place must not change the pairs
        x = simulator(given, generator=generator) if takes_generator else simulator(given)
        x = _simulated(x, count, xs[0].shape[1] if xs else None)
        thetas.append(theta)
        xs.append(x)
    theta, x = torch.cat(thetas), torch.cat(xs)
    finite = torch.isfinite(x).all(-1)
    num_dropped = int((~finite).sum())
    if num_dropped:
        warnings.warn(f"dropped {num_dropped} of {num_simulations} simulations with NaN/inf outputs", RuntimeWarning, stacklevel=2)
        if num_dropped == num_simulations:
            raise ValueError("every simulation returned NaN/inf: nothing to train on")
        theta, x = theta[finite], x[finite]
    return Simulations(theta, x, num_dropped)


def _simulated(x, count: int, dim_x: int | None) -> torch.Tensor:
    """A simulator's output for `count` parameters as float32 `(count, dim_x)` data (plain: a simulator's autograd
    graph must not reach the training loss), `dim_x` > 0 and that of the earlier batches; NaN/inf rows are kept
    for `simulate` to drop, while finite values beyond float32's range are refused (the cast made them inf, and
    they were dropped as failed simulations)."""
    try:
        x = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"the simulator must return a tensor or array (count, dim_x), got {type(x).__name__}") from error
    x = real_tensor(x, "the simulator's x").detach()
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if x.dim() != 2 or x.shape[0] != count or x.shape[1] == 0:
        raise ValueError(f"simulator returned shape {tuple(x.shape)} for a batch of {count} parameters; expected "
                         f"({count}, dim_x) with dim_x > 0")
    if dim_x is not None and x.shape[1] != dim_x:
        raise ValueError(f"simulator returned {x.shape[1]} columns after {dim_x} in earlier batches")
    cast = x.to(torch.float32)
    if (torch.isfinite(x) & ~torch.isfinite(cast)).any():
        raise ValueError("the simulator returned finite values beyond float32's range (|x| > 3.4e38): rescale them")
    return cast
