"""Continuous normalizing flows: sampling by integrating a velocity field from noise (t = 0) to data
(t = 1), and log-density by the augmented ODE with a pluggable divergence."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn

from fastflow._checks import positive_finite, positive_int, real_tensor
from fastflow.backends import bf16_products, check_mixed_precision, in_own_dtype
from fastflow.fm.divergence import Divergence, as_divergence
from fastflow.fm.fused import fused_unsupported, mlp_odeint
from fastflow.fm.nets import plain_velocity_mlp
from fastflow.fm.solvers import SOLVERS, OdeSolution, check_tolerances, odeint

__all__ = ["CNF", "OdeConfig"]


@dataclass(frozen=True)
class OdeConfig:
    """How a CNF integrates: `method` from `fastflow.fm.SOLVERS`, `steps` for fixed-step methods,
    `rtol`/`atol` for adaptive ones, and `mixed_precision` for sampling: "bf16" multiplies the velocity field's
    hidden layers in bfloat16 (a `VelocityMLP` on CPU: `VelocityMLP.sampling_field`; on CUDA with a fixed-step method:
    the fused Triton integrator's bf16 mode, `fastflow.fm.fused.mlp_odeint`; another field or case: under
    `torch.autocast`), "auto" does so on CPUs that multiply bfloat16 in hardware, "off" (the default) never. Densities
    (`CNF.log_prob`) always integrate in the model's dtype. bfloat16's rounding (~1e-3 of v) is below fixed-step
    methods' error at FMPE's 10 RK4 steps; adaptive ones at tolerances near it may take more steps (Dopri5 at 1e-5 on
    a 3x128 field: 50 evaluations against 38).

    `spacing` places fixed steps: the times are 1 - (1 - u)^spacing for u evenly spaced on [0, 1] (run backward for
    `log_prob`), so 1 takes even steps and larger values steps that shrink toward the data end t = 1, where the flow
    to a distribution narrow in the flow's space contracts, within a time of about its spread s. On the exact flow of
    the conditional OT path from N(0, 1) to N(0, s²), RK4 × 10 even steps end with spreads 1.23x too wide at s = 0.017,
    3.4x at 0.005; with spacing 2.5 (FMPE's sampler) within 0.7 % for s from 1 to 0.01 and 7 % down to 0.001."""

    method: str = "dopri5"
    steps: int = 20
    rtol: float = 1e-4
    atol: float = 1e-4
    mixed_precision: str = "off"
    spacing: float = 1.0

    def __post_init__(self):
        if self.method not in SOLVERS:
            raise ValueError(f"unknown ODE method {self.method!r}; known: {sorted(SOLVERS)}")
        positive_int(self.steps, "steps")  # (kept as given: a frozen dataclass, saved in configs)
        check_tolerances(self.rtol, self.atol)
        check_mixed_precision(self.mixed_precision)
        if positive_finite(self.spacing, "spacing") < 1:
            raise ValueError(f"spacing must be >= 1 (1: even steps), got {self.spacing!r}")

    def times(self, t_0: float, t_1: float) -> torch.Tensor:
        """The grid `(K + 1,)` from t_0 to t_1 (0 and 1, either way): the ends for an adaptive method, else `steps`
        intervals placed by `spacing`."""
        if {t_0, t_1} != {0.0, 1.0}:
            raise ValueError(f"a CNF integrates between t = 0 and t = 1, got {t_0} to {t_1}")
        if SOLVERS[self.method].adaptive:
            return torch.tensor([t_0, t_1], dtype=torch.float64)
        grid = torch.linspace(0.0, 1.0, self.steps + 1, dtype=torch.float64)
        if self.spacing != 1:
            grid = 1.0 - (1.0 - grid) ** self.spacing
        return grid if t_1 == 1.0 else grid.flip(0)

    def to_dict(self) -> dict:
        return asdict(self)


def _in_bf16(velocity: Callable) -> Callable:
    """velocity `(t, x, *args) -> v` evaluated under a bfloat16 autocast on x's device, v in x's dtype."""

    def field(t, x, *args):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return velocity(t, x, *args).to(x.dtype)

    return field


class CNF(nn.Module):
    """q(x | context): x_0 ~ N(0, I) carried to x_1 by dx_t/dt = v(t, x_t, context), then through the
    inverses of `transforms` (fixed bijections from data to the flow's space, e.g. standardization).

    Contexts broadcast as in `fastflow.flows.Flow`: `sample(n, context (C,))` is `(n, D)` and
    `sample(n, context (B, C))` is `(n, B, D)`; `log_prob(x (*, D), context (C,) or (*, C))` is `(*,)`.

    Arguments:
        velocity: module `(t, x_t (n, D)[, context (n, E)]) -> (n, D)` (e.g. `VelocityMLP`).
        dim: D.
        context_dim: C, 0 for an unconditional flow.
        transforms: `Transform`s applied data → flow space (their log-determinants enter `log_prob`).
        embedding: module applied to the context `(B, C) -> (B, E)` before the velocity.
        sampler: ODE options of `sample`.
        likelihood: ODE options of `log_prob` (the augmented ODE, integrated from t = 1 to t = 0).
        divergence: a key of `DIVERGENCES` ("exact", "hutchinson": one Rademacher probe), a `Divergence` such as
            `HutchinsonDivergence(num_probes=4)`, or a function `(velocity, t, x, *args) -> (v, div)`.
    """

    def __init__(self, velocity: nn.Module, dim: int, *, context_dim: int = 0, transforms: list[nn.Module] = (),
                 embedding: nn.Module | None = None, sampler: OdeConfig = OdeConfig(),
                 likelihood: OdeConfig = OdeConfig(rtol=1e-5, atol=1e-5), divergence: str | Divergence | Callable = "exact"):
        super().__init__()
        if likelihood.mixed_precision != "off":
            raise ValueError(f"the likelihood ODE integrates in the model's dtype: its mixed_precision must be 'off', "
                             f"got {likelihood.mixed_precision!r}")
        divergence = as_divergence(divergence)
        self.velocity = velocity
        self.dim, self.context_dim = dim, context_dim
        self.transforms = nn.ModuleList(transforms)
        self.embedding = embedding if embedding is not None else nn.Identity()
        self.sampler, self.likelihood, self.divergence = sampler, likelihood, divergence
        self.last_evaluations = 0

    # -- context ----------------------------------------------------------------------------------
    def embed(self, context: torch.Tensor | None) -> torch.Tensor | None:
        """The embedded context with its batch shape: `(*, C)` → `(*, E)` (None when unconditional), the context
        cast to the velocity field's dtype first."""
        if self.context_dim == 0:
            if context is not None:
                raise ValueError("this flow is unconditional: pass no context")
            return None
        if context is None or context.dim() == 0 or context.shape[-1] != self.context_dim:
            raise ValueError(f"this flow needs a context of last dimension {self.context_dim}, got "
                             f"{None if context is None else tuple(context.shape)}")
        if not torch.isfinite(context).all():
            raise ValueError("the context contains NaN or inf")
        embedded = self.embedding(context.reshape(-1, self.context_dim).to(self._parameter().dtype))
        return embedded.reshape(*context.shape[:-1], embedded.shape[-1])

    def _parameter(self) -> torch.Tensor:
        """A parameter (else a buffer) of the velocity field or the flow: the model's dtype and device; for a field
        with neither (an analytic one), an empty tensor of the default dtype on the CPU."""
        tensors = itertools.chain(self.velocity.parameters(), self.velocity.buffers(), self.parameters(), self.buffers())
        first = next(tensors, None)
        return torch.empty(0) if first is None else first

    def to_flow_space(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply `transforms` to `(n, D)` data: the flow-space points and their log|det J| `(n,)`."""
        total = x.new_zeros(x.shape[0])
        for transform in self.transforms:
            x, ladj = transform(x)
            total = total + ladj
        return x, total

    def _integrate(self, state, times, config: OdeConfig, f, args, trajectory: bool = False) -> OdeSolution:
        solution = odeint(f, state, times, method=config.method, args=args, rtol=config.rtol, atol=config.atol,
                          trajectory=trajectory)
        self.last_evaluations = solution.evaluations
        return solution

    # -- sampling and density ---------------------------------------------------------------------
    @torch.no_grad()
    @in_own_dtype
    def sample(self, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """Draws `(n, D)`, or `(n, B, D)` for a context `(B, C)`. On CUDA, a `VelocityMLP` with a fixed-step
        sampler integrates in the fused Triton kernel where it supports the field (`fastflow.fm.fused.mlp_odeint`)."""
        return self._sample(n, context, self.sampler.times(0.0, 1.0), trajectory=False)

    @torch.no_grad()
    @in_own_dtype
    def sample_trajectory(self, n: int, context: torch.Tensor | None = None, times=None) -> torch.Tensor:
        """Draws with their paths from the noise: the states at every time of `times`, in data space,
        `(K + 1, n, D)`, or `(K + 1, n, B, D)` for a context `(B, C)`; the last are samples as `sample` draws them (with an
        adaptive sampler, to its tolerance: the steps that end on each time of the grid differ from `sample`'s).

        times: increasing grid `(K + 1,)` from 0 to at most 1; the sampler's method integrates it (a fixed-step
        method takes one step per interval, an adaptive one ends a step on each time). None: the sampler's grid for
        fixed-step methods, 11 evenly spaced times for adaptive ones.
        """
        if times is None:
            times = self.sampler.times(0.0, 1.0) if not SOLVERS[self.sampler.method].adaptive else torch.linspace(0, 1, 11)
        grid = real_tensor(times, "times").to(torch.float64)
        if grid.dim() != 1 or grid.numel() < 2 or grid[0] != 0 or not (grid.diff() > 0).all() or grid[-1] > 1:
            raise ValueError(f"times must be an increasing grid from 0 to at most 1, got {times!r}")
        return self._sample(n, context, grid, trajectory=True)

    def _sample(self, n: int, context: torch.Tensor | None, times: torch.Tensor, trajectory: bool) -> torch.Tensor:
        n = positive_int(n, "number of samples")
        if context is not None and context.dim() > 2:
            raise ValueError(f"sampling takes a context (C,) or (B, C), got {tuple(context.shape)}")
        embedded = self.embed(context)
        contexts = 1 if embedded is None else embedded.reshape(-1, embedded.shape[-1]).shape[0]
        param = self._parameter()
        x_0 = torch.randn(n * contexts, self.dim, dtype=param.dtype, device=param.device)
        args = () if embedded is None else (embedded.reshape(contexts, embedded.shape[-1]).repeat(n, 1),)
        # one context for all draws goes to a VelocityMLP as (E,): its first layer's context term is then shared
        field_context = embedded.reshape(-1) if embedded is not None and contexts == 1 else (args[0] if args else None)
        bf16 = bf16_products(self.sampler.mixed_precision, x_0.device)
        method = self.sampler.method
        if x_0.device.type == "cuda" and plain_velocity_mlp(self.velocity) and not SOLVERS[method].adaptive and (
                not bf16 or fused_unsupported(self.velocity, x_0, method, field_context) is None):
            # the fused Triton integrator where it supports the field (backend "auto"), else odeint
            solution = mlp_odeint(self.velocity, x_0, times, method, context=field_context, bf16=bf16, trajectory=trajectory)
            self.last_evaluations = solution.evaluations
        elif plain_velocity_mlp(self.velocity) and self.velocity._runs_blocks(x_0):
            field = self.velocity.sampling_field(field_context, bf16=bf16)
            solution = self._integrate(x_0, times, self.sampler, field, field.args, trajectory)
        else:
            solution = self._integrate(x_0, times, self.sampler, _in_bf16(self.velocity) if bf16 else self.velocity, args,
                                       trajectory)
        x = solution.trajectory.reshape(-1, self.dim) if trajectory else solution.x
        for transform in reversed(self.transforms):
            x, _ = transform.inverse(x)
        shape = (n, contexts, self.dim) if context is not None and context.dim() == 2 else (n * contexts, self.dim)
        return x.reshape(-1, *shape) if trajectory else x.reshape(shape)

    @in_own_dtype
    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """log q(x | context) for x `(*, D)` by the augmented ODE; context `(C,)` or `(*, C)`; in the model's dtype
        (a caller's autocast is off inside, as in `sample`)."""
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension {self.dim}, got {tuple(x.shape)}")
        dtype = self._parameter().dtype
        if x.dtype != dtype:
            raise ValueError(f"x is {x.dtype} but the flow's parameters are {dtype} (convert one with .to())")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf")
        batch_shape = x.shape[:-1]
        x_1, ladj = self.to_flow_space(x.reshape(-1, self.dim))
        embedded = self.embed(context)
        args = ()
        if embedded is not None:
            try:
                embedded = embedded.expand(*batch_shape, embedded.shape[-1])
            except RuntimeError:
                raise ValueError(f"context batch shape {tuple(context.shape[:-1])} does not broadcast to "
                                 f"x batch shape {tuple(batch_shape)}") from None
            args = (embedded.reshape(x_1.shape[0], embedded.shape[-1]),)

        probes = self.divergence.draw(x_1)  # one draw per solve, sliced with the state by adaptive steps
        if probes is not None:
            args = (*args, probes)

        def augmented(t, state, *args):
            if probes is not None:
                *args, step_probes = args
            v, div = self.divergence(self.velocity, t, state[:, : self.dim], *args,
                                     probes=None if probes is None else step_probes)
            return torch.cat([v, div.unsqueeze(-1)], -1)

        state = torch.cat([x_1, x_1.new_zeros(x_1.shape[0], 1)], -1)
        end = self._integrate(state, self.likelihood.times(1.0, 0.0), self.likelihood, augmented, args).x
        x_0, log_det = end[:, : self.dim], end[:, self.dim]
        log_base = -0.5 * x_0.square().sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        return (log_base + log_det + ladj).reshape(batch_shape)
