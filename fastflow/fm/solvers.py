"""Batched ODE solvers dx/dt = f(t, x) for states `(n, S)`: explicit Runge–Kutta methods declared as
Butcher tableaus, fixed-step (Euler, midpoint, Heun, RK4) or adaptive with per-sample error control (Dopri5 and
Bogacki–Shampine 3(2): torchdiffeq's "dopri5" and "bosh3")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from fastflow._checks import positive_finite, positive_int, real_tensor

__all__ = ["SOLVERS", "ButcherTableau", "OdeSolution", "check_tolerances", "odeint"]


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method: nodes c, lower-triangular rows a, weights b, its order, and for
    embedded pairs the error weights b - b̂ (None for fixed-step methods)."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    error: tuple[float, ...] | None = None

    def __post_init__(self):
        # the adaptive solver reuses the last stage as the next step's first: it must be f at the new state
        if self.adaptive and not (self.c[-1] == 1.0 and self.a[-1] == self.b[:-1] and self.b[-1] == 0.0):
            raise ValueError("an adaptive tableau must be first-same-as-last (c_s = 1, a_s = b, b_s = 0)")

    @property
    def adaptive(self) -> bool:
        return self.error is not None


_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI5_B_HAT = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_BOSH3_B, _BOSH3_B_HAT = (2 / 9, 1 / 3, 4 / 9, 0.0), (7 / 24, 1 / 4, 1 / 3, 1 / 8)


def _difference(b: tuple[float, ...], b_hat: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(w - w_hat for w, w_hat in zip(b, b_hat))


SOLVERS: dict[str, ButcherTableau] = {
    "euler": ButcherTableau(c=(0.0,), a=((),), b=(1.0,), order=1),
    "midpoint": ButcherTableau(c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), order=2),
    "heun": ButcherTableau(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2),
    "rk4": ButcherTableau(
        c=(0.0, 0.5, 0.5, 1.0), a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), b=(1 / 6, 1 / 3, 1 / 3, 1 / 6), order=4
    ),
    # Dormand & Prince (1980): 5th-order solution, embedded 4th-order estimate, first same as last.
    "dopri5": ButcherTableau(
        c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        a=(
            (),
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            _DOPRI5_B[:6],
        ),
        b=_DOPRI5_B,
        order=5,
        error=_difference(_DOPRI5_B, _DOPRI5_B_HAT),
    ),
    # Bogacki & Shampine (1989): 3rd-order solution, embedded 2nd-order estimate, first same as last.
    "bosh3": ButcherTableau(
        c=(0.0, 1 / 2, 3 / 4, 1.0), a=((), (1 / 2,), (0.0, 3 / 4), _BOSH3_B[:3]), b=_BOSH3_B, order=3,
        error=_difference(_BOSH3_B, _BOSH3_B_HAT),
    ),
}


@dataclass
class OdeSolution:
    """The state at the final time `(n, S)`, the number of (batched) evaluations of f, for adaptive methods
    the accepted and rejected steps summed over samples, and when asked for, the states at every time of the
    grid `(K + 1, n, S)` (as torchdiffeq's `odeint` returns)."""

    x: torch.Tensor
    evaluations: int
    accepted: int = 0
    rejected: int = 0
    trajectory: torch.Tensor | None = None


def _combine(weights: Sequence[float], k: list[torch.Tensor]) -> torch.Tensor | None:
    terms = [w * k_j for w, k_j in zip(weights, k) if w != 0.0]
    return sum(terms[1:], terms[0]) if terms else None


def _advance(x: torch.Tensor, h, weights: Sequence[float], k: list[torch.Tensor]) -> torch.Tensor:
    """x + h Σ_j w_j k_j (zero weights skipped) in x's dtype, for a step h that is a float (one new tensor,
    accumulated in place) or an `(n, 1)` tensor (k in the adaptive solve's working precision, rounded once)."""
    if isinstance(h, torch.Tensor):
        increment = _combine(weights, k)
        return x if increment is None else torch.addcmul(x, h, increment).to(x.dtype)
    out = x
    for w, k_j in zip(weights, k):
        if w != 0.0:
            out = torch.add(x, k_j, alpha=h * w) if out is x else out.add_(k_j, alpha=h * w)
    return out


def _stages(f, tableau: ButcherTableau, times, x, h, args, k_1) -> list[torch.Tensor]:
    """The stage derivatives k_1..k_s of one step of size h (float or `(n, 1)`) from x, with stage i
    evaluated at times[i]."""
    k = [k_1]
    for t_i, a_i in zip(times[1:], tableau.a[1:]):
        k.append(f(t_i, _advance(x, h, a_i, k), *args))
    return k


def _stage_times(grid: Sequence[float], c: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    """`(K, S)` times of the S stages of each of the K steps of a grid: t_k in `dtype` plus c_s h_k."""
    starts = torch.tensor(grid[:-1], dtype=torch.float64)
    steps = torch.tensor(grid[1:], dtype=torch.float64) - starts
    return starts.to(dtype)[:, None] + (torch.tensor(c, dtype=torch.float64)[None, :] * steps[:, None]).to(dtype)


def check_tolerances(rtol: float, atol: float) -> None:
    """Adaptive tolerances must be finite positive numbers (a NaN one would never accept a step)."""
    positive_finite(rtol, "rtol")
    positive_finite(atol, "atol")


def _evaluate_first(f, t, x, args) -> torch.Tensor:
    """f(t, x, *args), checked once per solve: the velocity must have the state's shape `(n, S)` (broadcasting
    would hide a wrong field)."""
    k = f(t, x, *args)
    if not isinstance(k, torch.Tensor) or k.shape != x.shape:
        raise ValueError(f"f must return the state's shape {tuple(x.shape)}, got {tuple(getattr(k, 'shape', ())) or type(k)}")
    if torch.promote_types(k.dtype, x.dtype) != x.dtype:  # (fixed steps promoted the state; adaptive ones failed)
        raise ValueError(f"f must return the state's dtype {x.dtype} or a lower precision (autocast), got {k.dtype}")
    return k


def _check_times(times) -> list[float]:
    if isinstance(times, torch.Tensor) and times.requires_grad:
        raise ValueError("gradients with respect to the times are not supported: pass times without requires_grad")
    times = real_tensor(times, "times").to(torch.float64)  # (complex grids lost their imaginary parts)
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError(f"times must be a 1-D grid of at least 2 points, got shape {tuple(times.shape)}")
    if not torch.isfinite(times).all():
        raise ValueError("times must be finite")
    steps = times.diff()
    if not ((steps > 0).all() or (steps < 0).all()):
        raise ValueError("times must be strictly increasing (forward) or strictly decreasing (backward in time)")
    return times.tolist()


def odeint(f: Callable[..., torch.Tensor], x: torch.Tensor, times, *, method: str = "rk4", args: tuple = (),
           rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 10_000, trajectory: bool = False) -> OdeSolution:
    """Integrate dx/dt = f(t, x, *args) from times[0] to times[-1] for a batch of states.

    Arguments:
        f: `(t, x (n, S), *args) -> (n, S)`; t (in x's dtype) is a 0-d tensor for fixed-step methods and `(n, 1)`
            (one time per sample, a column: `t * x` means the same for both) for adaptive ones.
        x: `(n, S)` initial states at times[0].
        times: strictly monotone grid `(K + 1,)` (decreasing grids integrate backward in time); fixed-step
            methods take one step per interval; adaptive methods choose their own steps and end one on each
            time of the grid (a step cut short there does not shrink the next one).
        method: a key of `SOLVERS`: "euler", "midpoint", "heun", "rk4" (fixed) or "dopri5", "bosh3" (adaptive).
        args: tensors `(n, ...)` passed to f, sliced with the state when adaptive steps drop finished samples.
        rtol, atol: per-sample error tolerances of adaptive methods (RMS norm over the state).
        max_steps: limit on adaptive step attempts.
        trajectory: also return the states at every time of the grid, `(K + 1, n, S)` (differentiable).

    Returns:
        `OdeSolution` with the final state `(n, S)`.
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown ODE method {method!r}; known: {sorted(SOLVERS)}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point() or x.shape[1] == 0:
        raise ValueError(f"x must be a floating (n, S) tensor with S >= 1, got {getattr(x, 'shape', type(x))}")
    if not torch.isfinite(x).all():
        raise ValueError("the initial state contains NaN or inf")
    for a in args:
        if not isinstance(a, torch.Tensor) or a.shape[:1] != x.shape[:1]:
            raise ValueError(f"args must be tensors with leading dimension n = {x.shape[0]}")
    if not isinstance(trajectory, bool):
        raise TypeError(f"trajectory must be True or False, got {trajectory!r}")
    grid = _check_times(times)
    tableau = SOLVERS[method]
    if not tableau.adaptive:
        return _fixed(f, tableau, x, grid, args, trajectory)
    check_tolerances(rtol, atol)
    max_steps = positive_int(max_steps, "max_steps")
    return _adaptive(f, tableau, x, grid, args, rtol, atol, max_steps, trajectory)


def _fixed(f, tableau, x, grid, args, trajectory: bool) -> OdeSolution:
    times = _stage_times(grid, tableau.c, x.dtype).to(x.device)  # one copy to the device, not one per step
    states = [x] if trajectory else None
    for step, (t_0, t_1) in enumerate(zip(grid[:-1], grid[1:])):
        h = t_1 - t_0
        k_1 = _evaluate_first(f, times[step, 0], x, args) if step == 0 else f(times[step, 0], x, *args)
        k = _stages(f, tableau, times[step], x, h, args, k_1)
        x = _advance(x, h, tableau.b, k)
        if trajectory:
            states.append(x)
    return OdeSolution(checked_finite(x, _method_name(tableau)), evaluations=len(tableau.b) * (len(grid) - 1),
                       trajectory=torch.stack(states) if trajectory else None)


def checked_finite(x: torch.Tensor, method: str) -> torch.Tensor:
    """The final states of a fixed-step solve `(n, S)`, checked once per solve (one sync): NaN or inf there means
    the velocity returned them or the steps were too large for the field (adaptive solves raise as they step)."""
    if not torch.isfinite(x).all():
        raise RuntimeError(f"the {method} solve ended with NaN or inf states: the velocity returned NaN or inf, or the "
                           "steps are too large for this field (take more steps or an adaptive method)")
    return x


def per_sample_times(t, n: int, like: torch.Tensor) -> torch.Tensor:
    """Times as a velocity field may get them (a number or 0-d tensor, `(n,)`, or the column `(n, 1)` of adaptive
    solves and `cfm_loss`) as a 0-d or `(n,)` tensor in `like`'s dtype and device; other shapes raise (an `(n, 1)`
    against `(n,)` rows once broadcast every row against every time)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.shape not in ((), (n,), (n, 1)):
        raise ValueError(f"t must be a scalar, ({n},) or ({n}, 1), got {tuple(t.shape)}")
    return t.reshape(-1) if t.dim() else t


def _column(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample times `(n,)` as f gets them: `(n, 1)` in the state's dtype."""
    return t.to(dtype).unsqueeze(-1)


def _rms(values: torch.Tensor) -> torch.Tensor:
    return values.square().mean(-1).sqrt()


def _adaptive(f, tableau, x, grid, args, rtol, atol, max_steps, trajectory: bool) -> OdeSolution:
    """Per-sample adaptive steps, each sample ending a step on every time of the grid in turn. Times and step sizes
    are float64 (f gets them in the state's dtype), error norms at least float32 (a float16 state's squares
    overflow), and the step-size control is detached: gradients flow through the accepted steps, not through the
    choice of their sizes."""
    n = x.shape[0]
    t_0, t_1 = grid[0], grid[-1]
    direction = 1.0 if t_1 > t_0 else -1.0
    span = abs(t_1 - t_0)
    exponent = -1.0 / tableau.order
    # stages combined in at least float32: dopri5's weights (up to 11.6, cancelling) lost digits in a bfloat16
    # velocity's precision (errors 3-7x the float32 combination's of the same values) and overflowed float16 (NaN)
    norm_dtype = torch.promote_types(x.dtype, torch.float32)

    def f_working(t, state, *args):
        return f(t, state, *args).to(norm_dtype)

    t = torch.full((n,), t_0, dtype=torch.float64, device=x.device)
    grid_times = torch.tensor(grid, dtype=torch.float64, device=x.device)
    target = torch.ones(n, dtype=torch.long, device=x.device)  # each sample's next grid time
    k_1 = _evaluate_first(f, _column(t, x.dtype), x, args).to(norm_dtype)
    if not torch.isfinite(k_1).all():
        raise RuntimeError(f"the velocity returned NaN or inf at t = {t_0}")
    h = _initial_step(f_working, tableau, x, t, k_1, args, direction, span, rtol, atol, norm_dtype)
    solution = OdeSolution(x, evaluations=2)
    if trajectory:
        # written in place as samples reach each time (autograd records the writes)
        solution.trajectory = x.new_empty(len(grid), *x.shape)
        solution.trajectory[0] = x
    if n == 0:
        return solution
    active = torch.arange(n, device=x.device)
    for _ in range(max_steps):
        every = active.numel() == n
        x_a, t_a, k_a, h_a, target_a = (x, t, k_1, h, target) if every else (
            x[active], t[active], k_1[active], h[active], target[active])
        args_a = args if every else tuple(a[active] for a in args)
        t_next = grid_times[target_a]
        remaining = (t_next - t_a).abs()
        step = torch.minimum(h_a, remaining)
        signed = (direction * step).unsqueeze(-1)  # float64, for the error norm
        signed_x = signed.to(x.dtype)
        stage_times = [_column(t_a + c_i * direction * step, x.dtype) for c_i in tableau.c]
        k = _stages(f_working, tableau, stage_times, x_a, signed_x, args_a, k_a)
        solution.evaluations += len(tableau.b) - 1
        x_new = _advance(x_a, signed_x, tableau.b, k)
        with torch.no_grad():
            error = signed * _combine(tableau.error, k).to(norm_dtype)
            norm = _rms(error / (atol + rtol * torch.maximum(x_a.abs(), x_new.abs()).to(norm_dtype)))
        accept = norm <= 1.0  # False for NaN
        reached = accept & (step >= remaining)
        finished = reached & (target_a == len(grid) - 1)
        rows = active[accept]
        # out of place, so that gradients flow through the solve (e.g. MAP on a CNF's log-density) and f may keep
        # the times it was given for its backward pass
        x = x.index_copy(0, rows, x_new[accept])
        k_1 = k_1.index_copy(0, rows, k[-1][accept])
        solution.x = x
        t = t.index_copy(0, rows, torch.where(reached[accept], t_next[accept], t_a[accept] + direction * step[accept]))
        if trajectory:
            solution.trajectory[target_a[reached], active[reached]] = x_new[reached]
        target = target.index_add(0, active[reached], torch.ones_like(target_a[reached]))
        factor = (0.9 * norm.double().clamp_min(1e-10) ** exponent).clamp(0.2, 10.0).nan_to_num(0.2)
        proposal = step * factor
        # a step cut short to land on a grid time keeps the size proposed before it
        h[active] = torch.where(reached & (step < h_a), torch.maximum(h_a, proposal), proposal)
        # (rows that just finished are left out: their last step may be a tiny remainder)
        if not (h[active][~finished] >= 1e-12 * span).all():  # NaN fails too
            raise RuntimeError("adaptive step size underflow: the ODE is too stiff or the velocity returned NaN")
        solution.accepted += int(accept.sum())
        solution.rejected += int((~accept).sum())
        active = active[~finished]
        if active.numel() == 0:
            return solution
    raise RuntimeError(f"{_method_name(tableau)} did not reach t = {t_1} within max_steps = {max_steps}")


@torch.no_grad()
def _initial_step(f, tableau, x, t, k_1, args, direction: float, span: float, rtol: float, atol: float,
                  norm_dtype) -> torch.Tensor:
    """Per-sample first step sizes `(n,)` float64 (Hairer, Nørsett & Wanner, II.4, as scipy and torchdiffeq): h_0 =
    1 % of ||x|| / ||f|| (1e-6 of the span where x or f is about 0: HNW's 1e-6 time units underflow on spans over
    1e6), then one Euler step of h_0 estimates the change of f, d_2, and the step is min(100 h_0,
    (0.01 / max(||f||, d_2))^(1 / order)), at most the span. One more evaluation of f; without the second part a
    field small in x but fast in t got steps that straddled its oscillations (Bogacki–Shampine stepped over
    0.1 cos(40πt) in 2 steps, off by 0.1 at tolerance 1e-5)."""
    x_norm = x.to(norm_dtype)
    scale = atol + rtol * x_norm.abs()
    d_0, d_1 = _rms(x_norm / scale), _rms(k_1.to(norm_dtype) / scale)
    h_0 = torch.where((d_0 < 1e-5) | (d_1 < 1e-5), torch.full_like(d_0, 1e-6 * span), 0.01 * d_0 / d_1).double()
    h_0 = h_0.clamp(max=span)
    euler = (x + (direction * h_0).unsqueeze(-1).to(x.dtype) * k_1).to(x.dtype)
    k_euler = f(_column(t + direction * h_0, x.dtype), euler, *args)
    d_2 = _rms((k_euler - k_1).to(norm_dtype) / scale).double() / h_0
    largest = torch.maximum(d_1.double(), d_2)
    h_1 = torch.where(largest <= 1e-15, (h_0 * 1e-3).clamp(min=1e-6 * span),
                      (0.01 / largest.clamp_min(1e-15)) ** (1.0 / tableau.order))
    return torch.minimum(100 * h_0, h_1).clamp(max=span).nan_to_num(1e-6 * span)


def _method_name(tableau: ButcherTableau) -> str:
    return next((name for name, value in SOLVERS.items() if value is tableau), "custom tableau's")
