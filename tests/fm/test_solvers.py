"""ODE solvers: convergence order on an ODE with a known solution, adaptive accuracy, backward
integration, per-sample step control, and bad input."""

import math

import numpy as np
import pytest
import torch

from fastflow.fm import SOLVERS, ButcherTableau, odeint
from fastflow.fm.solvers import _fixed

FIXED = {name: tableau.order for name, tableau in SOLVERS.items() if not tableau.adaptive}
ADAPTIVE = sorted(name for name, tableau in SOLVERS.items() if tableau.adaptive)


def rotation(t, x):
    """dx/dt = (1 + t) J x: x(t) = R(t + t²/2) x(0), a rotation by θ(t) = t + t²/2."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
    return (1 + t) * torch.stack([x[:, 1], -x[:, 0]], -1)


def exact(x_0, t):
    angle = torch.as_tensor(t + t * t / 2, dtype=x_0.dtype)
    c, s = angle.cos(), angle.sin()
    return torch.stack([c * x_0[:, 0] + s * x_0[:, 1], -s * x_0[:, 0] + c * x_0[:, 1]], -1)


X_0 = torch.tensor([[1.0, 0.0], [0.3, -2.0], [0.0, 0.5]], dtype=torch.float64)


@pytest.mark.parametrize("method", sorted(FIXED))
def test_fixed_step_convergence_order(method):
    errors = [(odeint(rotation, X_0, torch.linspace(0, 1.5, n + 1), method=method).x - exact(X_0, 1.5)).abs().max()
              for n in (40, 80, 160)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(order - FIXED[method]) < 0.25 for order in orders), orders


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_tableau_and_its_embedded_estimate_have_their_order(name):
    """The weights b (and for adaptive methods the embedded b - error, one order lower) as fixed-step methods."""
    tableau = SOLVERS[name]
    weights = {tableau.order: tableau.b}
    if tableau.adaptive:
        weights[tableau.order - 1] = tuple(b - e for b, e in zip(tableau.b, tableau.error))
    for order, b in weights.items():
        method = ButcherTableau(c=tableau.c, a=tableau.a, b=b, order=order)
        errors = [(_fixed(rotation, method, X_0, torch.linspace(0, 1.5, n + 1).tolist(), (), False).x
                   - exact(X_0, 1.5)).abs().max() for n in (20, 40, 80)]
        measured = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
        assert all(abs(m - order) < 0.3 for m in measured), (order, measured)


def test_adaptive_tableaus_must_reuse_their_last_stage():
    with pytest.raises(ValueError, match="first-same-as-last"):
        ButcherTableau(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2, error=(-0.5, 0.5))  # adaptive Heun


@pytest.mark.parametrize("method", sorted(FIXED))
def test_backward_in_time_inverts_forward(method):
    forward = odeint(rotation, X_0, torch.linspace(0, 1, 201), method=method).x
    back = odeint(rotation, forward, torch.linspace(1, 0, 201), method=method).x
    tol = {1: 0.05, 2: 1e-4, 4: 1e-9}[FIXED[method]]
    assert (back - X_0).abs().max() < tol


@pytest.mark.parametrize("tol", [1e-4, 1e-7, 1e-10])
@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_methods_meet_their_tolerance(method, tol):
    solution = odeint(rotation, X_0, [0.0, 2.0], method=method, rtol=tol, atol=tol)
    assert (solution.x - exact(X_0, 2.0)).abs().max() < 50 * tol
    back = odeint(rotation, solution.x, [2.0, 0.0], method=method, rtol=tol, atol=tol)
    assert (back.x - X_0).abs().max() < 100 * tol


def test_dopri5_per_sample_steps():
    """Samples with a fast and a slow rate: the slow ones finish early and stop costing evaluations, and
    each reaches its own tolerance."""
    rates = torch.tensor([0.1, 0.1, 0.1, 20.0], dtype=torch.float64)
    f = lambda t, x, rate: -rate.unsqueeze(-1) * x
    x_0 = torch.ones(4, 1, dtype=torch.float64)
    solution = odeint(f, x_0, [0.0, 1.0], method="dopri5", args=(rates,), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(solution.x.squeeze(-1), torch.exp(-rates), atol=1e-7, rtol=1e-6)
    alone = odeint(lambda t, x: -0.1 * x, x_0[:3], [0.0, 1.0], method="dopri5", rtol=1e-8, atol=1e-8)
    fast_alone = odeint(lambda t, x: -20.0 * x, x_0[:1], [0.0, 1.0], method="dopri5", rtol=1e-8, atol=1e-8)
    # each sample takes the steps it takes alone: the fast one does not shrink the slow ones' steps
    assert 0 < alone.accepted < fast_alone.accepted * 3
    assert (solution.accepted, solution.rejected) == (alone.accepted + fast_alone.accepted,
                                                      alone.rejected + fast_alone.rejected)


@pytest.mark.parametrize("method", sorted(FIXED))
def test_fixed_step_trajectory_holds_the_state_at_every_grid_time(method):
    grid = torch.tensor([0.0, 0.1, 0.15, 0.6, 1.0])
    solution = odeint(rotation, X_0, grid, method=method, trajectory=True)
    assert solution.trajectory.shape == (5, 3, 2) and odeint(rotation, X_0, grid, method=method).trajectory is None
    assert torch.equal(solution.trajectory[0], X_0) and torch.equal(solution.trajectory[-1], solution.x)
    for i in range(1, 5):
        assert torch.equal(solution.trajectory[i], odeint(rotation, X_0, grid[: i + 1], method=method).x)


@pytest.mark.parametrize("grid", [torch.linspace(0.0, 2.0, 11), torch.linspace(2.0, 0.0, 11)])
@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_trajectory_lands_on_every_grid_time(method, grid):
    tol = 1e-8
    x_start = exact(X_0, float(grid[0]))
    solution = odeint(rotation, x_start, grid, method=method, rtol=tol, atol=tol, trajectory=True)
    assert torch.equal(solution.trajectory[0], x_start) and torch.equal(solution.trajectory[-1], solution.x)
    for state, t in zip(solution.trajectory, grid.tolist()):
        assert (state - exact(X_0, t)).abs().max() < 50 * tol


def test_dopri5_trajectory_with_per_sample_rates():
    rates = torch.tensor([0.1, 3.0, 20.0], dtype=torch.float64)
    grid = torch.tensor([0.0, 0.01, 0.3, 1.0], dtype=torch.float64)
    solution = odeint(lambda t, x, rate: -rate.unsqueeze(-1) * x, torch.ones(3, 1, dtype=torch.float64), grid,
                      method="dopri5", args=(rates,), rtol=1e-9, atol=1e-9, trajectory=True)
    torch.testing.assert_close(solution.trajectory.squeeze(-1), torch.exp(-grid[:, None] * rates), atol=1e-8, rtol=1e-7)


def test_dopri5_step_cut_short_at_a_grid_time_does_not_shrink_the_next():
    """A grid time 1e-7 after another forces a tiny step; the step after it keeps the size proposed before it
    (shrinking to 10x the tiny step cost 45 accepted steps here instead of 27)."""
    tol = 1e-4
    stops = odeint(rotation, X_0, [0.0, 0.5, 0.5 + 1e-7, 2.0], method="dopri5", rtol=tol, atol=tol, trajectory=True)
    plain = odeint(rotation, X_0, [0.0, 2.0], method="dopri5", rtol=tol, atol=tol)
    assert stops.accepted <= plain.accepted + 2 * X_0.shape[0]  # at most the two extra stops per sample
    assert (stops.trajectory[1] - exact(X_0, 0.5)).abs().max() < 50 * tol


def test_gradients_flow_through_a_trajectory():
    x_0 = X_0.clone().requires_grad_(True)
    odeint(rotation, x_0, torch.linspace(0, 2, 11), method="dopri5", rtol=1e-9, atol=1e-9,
           trajectory=True).trajectory[5].sum().backward()
    x_exact = X_0.clone().requires_grad_(True)
    exact(x_exact, 1.0).sum().backward()
    torch.testing.assert_close(x_0.grad, x_exact.grad, atol=1e-7, rtol=1e-7)


def test_gradients_flow_through_adaptive_solve():
    """d x(1) / d x_0 through the accepted dopri5 steps against the exact solution's."""
    x_0 = X_0.clone().requires_grad_(True)
    odeint(rotation, x_0, [0.0, 1.0], method="dopri5", rtol=1e-9, atol=1e-9).x.sum().backward()
    x_exact = X_0.clone().requires_grad_(True)
    exact(x_exact, 1.0).sum().backward()
    torch.testing.assert_close(x_0.grad, x_exact.grad, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_first_step_sees_a_field_that_is_small_but_fast_in_time(method):
    """dx/dt = 0.1 cos(ωt): the first step came from ||x|| / ||f|| alone (0.2 here), and Bogacki–Shampine's stages
    then sampled cos(40πt) only at its crests (2 steps, off by 0.1 at tolerance 1e-5). The first step now also
    sees the change of f over a trial Euler step (HNW II.4)."""
    x_0 = torch.full((1, 1), 2.0, dtype=torch.float64)
    for k in (10, 19, 23, 40):
        omega = k * math.pi
        solution = odeint(lambda t, x: 0.1 * torch.cos(omega * t).expand_as(x), x_0, [0.0, 1.0], method=method,
                          rtol=1e-5, atol=1e-5)
        assert abs(solution.x.item() - (2.0 + 0.1 * math.sin(omega) / omega)) < 2e-3


@pytest.mark.parametrize("method", ADAPTIVE)
def test_a_solve_may_take_exactly_max_steps(method):
    """The last step attempt ends every sample: no "did not reach" error (the check ran only before the next one)."""
    attempts = (lambda s: s.accepted + s.rejected)(odeint(rotation, X_0[:1], [0.0, 0.5, 1.0], method=method))
    odeint(rotation, X_0[:1], [0.0, 0.5, 1.0], method=method, max_steps=attempts)
    with pytest.raises(RuntimeError, match="did not reach"):
        odeint(rotation, X_0[:1], [0.0, 0.5, 1.0], method=method, max_steps=attempts - 1)
    assert odeint(rotation, X_0[:0], [0.0, 1.0], method=method).x.shape == (0, 2)


def test_bad_input():
    with pytest.raises(ValueError, match="strictly increasing"):
        odeint(rotation, X_0, [0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        odeint(rotation, X_0, [0.0, 0.7, 0.5])
    with pytest.raises(ValueError, match="at least 2 points"):
        odeint(rotation, X_0, [0.0])
    with pytest.raises(ValueError, match="NaN"):
        odeint(rotation, torch.tensor([[math.nan, 0.0]]), [0.0, 1.0])
    with pytest.raises(ValueError, match=r"\(n, S\)"):
        odeint(rotation, torch.ones(3), [0.0, 1.0])
    with pytest.raises(ValueError, match="unknown ODE method"):
        odeint(rotation, X_0, [0.0, 1.0], method="rk45")
    with pytest.raises(ValueError, match="leading dimension"):
        odeint(rotation, X_0, [0.0, 1.0], args=(torch.ones(2),))
    with pytest.raises(ValueError, match="positive"):
        odeint(rotation, X_0, [0.0, 1.0], method="dopri5", rtol=0)
    with pytest.raises(ValueError, match="finite positive"):
        odeint(rotation, X_0, [0.0, 1.0], method="dopri5", rtol=math.nan)
    with pytest.raises(RuntimeError, match="NaN or inf at t = 0.0"):  # at once, not after max_steps
        odeint(lambda t, x: x * math.nan, X_0, [0.0, 1.0], method="dopri5")
    with pytest.raises(RuntimeError, match="underflow"):  # NaN from the middle of the span on
        odeint(lambda t, x: x * torch.where(t < 0.5, 1.0, math.nan), X_0, [0.0, 1.0], method="dopri5")
    with pytest.raises(TypeError, match="trajectory must be True or False"):
        odeint(rotation, X_0, [0.0, 1.0], trajectory=1)
    for grid in (torch.tensor([0.0, 1.0 + 5.0j]), np.array([0.0, 1.0 + 5.0j])):  # (integrated over [0, 1])
        with pytest.raises(TypeError, match="times must be real"):
            odeint(rotation, X_0, grid)


def test_numpy_grids_and_tolerances_are_taken():
    """A reversed numpy grid (negative strides) failed inside torch; numpy tolerances were refused as not numbers."""
    grid = np.linspace(0.0, 1.0, 3)
    forward = odeint(rotation, X_0, grid, method="dopri5", rtol=np.float32(1e-6), atol=np.float64(1e-6))
    back = odeint(rotation, forward.x, grid[::-1], method="dopri5", rtol=np.float32(1e-6), atol=np.float64(1e-6))
    torch.testing.assert_close(back.x, X_0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_fixed_steps_ending_in_nan_raise(method):
    """A fixed-step solve whose velocity turns NaN (or whose states overflow) raises at its end, as adaptive ones
    raise as they step; it returned the NaN states before."""
    with pytest.raises(RuntimeError, match=f"the {method} solve ended with NaN or inf"):
        odeint(lambda t, x: x * torch.where(t < 0.5, 1.0, math.nan), X_0, [0.0, 0.5, 1.0], method=method)
    with pytest.raises(RuntimeError, match="NaN or inf"):
        odeint(lambda t, x: x * x, torch.full((2, 1), 10.0), torch.linspace(0, 1, 50), method=method)  # blows up at 0.1


@pytest.mark.parametrize("method", ["euler", "dopri5"])
def test_a_velocity_of_another_shape_is_refused(method):
    """Broadcasting (n, 1) against the state would integrate a different field without a word."""
    with pytest.raises(ValueError, match=r"state's shape \(3, 2\), got \(3, 1\)"):
        odeint(lambda t, x: x[:, :1], X_0[:3], [0.0, 1.0], method=method)


@pytest.mark.parametrize("method", ["rk4", "dopri5", "bosh3"])
def test_a_field_written_for_scalar_times_integrates_alike(method):
    """dx/dt = t x as torchdiffeq users write it, on a state with as many rows as columns: adaptive methods pass
    one time per row as a column (n, 1), so that t * x scales rows (as (n,) it scaled columns: off by 0.08)."""
    x_0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    grid = [0.0, 1.0] if SOLVERS[method].adaptive else torch.linspace(0, 1, 101)
    solution = odeint(lambda t, x: t * x, x_0, grid, method=method, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(solution.x, x_0 * math.exp(0.5), atol=1e-7, rtol=0)


def test_states_of_another_dtype_or_no_width_or_differentiable_times_are_refused():
    """A float64 velocity for a float32 state promoted fixed-step states and failed adaptive ones; a state of width
    0 gave "step size underflow"; gradients with respect to the times came back None."""
    for method in ("rk4", "dopri5"):
        with pytest.raises(ValueError, match="state's dtype torch.float32"):
            odeint(lambda t, x: (-x).double(), torch.ones(2, 2), [0.0, 1.0], method=method)
        with pytest.raises(ValueError, match="S >= 1"):
            odeint(lambda t, x: -x, torch.ones(3, 0), [0.0, 1.0], method=method)
        with pytest.raises(ValueError, match="gradients with respect to the times"):
            odeint(lambda t, x: -x, torch.ones(2, 1), torch.tensor([0.0, 1.0], requires_grad=True), method=method)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_a_lower_precision_velocity_under_autocast(method):
    """A bfloat16 velocity (autocast) for a float32 state keeps the state float32 (the dtype check refused it)."""
    from fastflow.fm import VelocityMLP

    torch.manual_seed(0)
    net, x_0 = VelocityMLP(2, hidden=(16,)), torch.randn(8, 2)
    expected = odeint(net, x_0, torch.linspace(0, 1, 11), method=method).x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        solution = odeint(net, x_0, torch.linspace(0, 1, 11), method=method)
    assert solution.x.dtype == torch.float32
    torch.testing.assert_close(solution.x, expected, atol=0.05, rtol=0)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_adaptive_stages_of_a_bfloat16_velocity_combine_in_float32(method):
    """Stages were combined in the velocity's bfloat16 (dopri5's weights up to 11.6 cancel): an oscillator's errors were
    3-7x those of the same bfloat16 values returned in float32; now the solves are the same."""
    omega = torch.tensor([[1.0], [3.0], [7.0]])

    def oscillator(t, x, omega):
        return torch.cat([x[:, 1:], -(omega**2) * x[:, :1]], 1).bfloat16()

    x_0 = torch.cat([torch.ones(3, 1), torch.zeros(3, 1)], 1)
    options = dict(method=method, rtol=1e-3, atol=1e-3, args=(omega,))
    low = odeint(oscillator, x_0, [0.0, 2.0], **options)
    cast = odeint(lambda t, x, omega: oscillator(t, x, omega).float(), x_0, [0.0, 2.0], **options)
    assert low.x.dtype == torch.float32 and low.evaluations == cast.evaluations
    torch.testing.assert_close(low.x, cast.x, atol=0, rtol=0)


def test_dopri5_keeps_time_in_float64():
    """t = 10^4 + s in float32 is 1e-3 coarse: the span's end and the steps are kept in float64 (as in torchdiffeq)."""
    solution = odeint(lambda t, x: torch.ones_like(x), torch.zeros(2, 1), [1e4, 1e4 + 1], method="dopri5")
    torch.testing.assert_close(solution.x, torch.ones(2, 1), atol=1e-5, rtol=0)


def test_dopri5_gradients_through_a_field_that_keeps_t():
    """A learned time layer saves t for its backward pass: the solver must not overwrite it in place."""
    time_layer = torch.nn.Linear(1, 2).double()
    x_0 = X_0.clone().requires_grad_(True)
    odeint(lambda t, x: -x + time_layer(t), x_0, [0.0, 1.0], method="dopri5").x.sum().backward()
    assert torch.isfinite(x_0.grad).all() and torch.isfinite(time_layer.weight.grad).all()


def test_dopri5_on_a_float16_state():
    """Error norms in float32: squares of float16 ratios overflowed, and every step was rejected."""
    solution = odeint(lambda t, x: -x, torch.ones(4, 2, dtype=torch.float16), [0.0, 1.0], method="dopri5",
                      rtol=1e-3, atol=1e-3)
    assert solution.x.dtype == torch.float16
    torch.testing.assert_close(solution.x.float(), torch.full((4, 2), math.exp(-1.0)), atol=3e-3, rtol=0)
    # fast fields: 11.6 k overflowed float16 in the stage combination (inf - inf: every step rejected, "underflow")
    fast = odeint(lambda t, x: -2e4 * x, torch.ones(2, 1, dtype=torch.float16), [0.0, 1e-3], method="dopri5",
                  rtol=1e-3, atol=1e-3)
    assert fast.x.dtype == torch.float16 and fast.x.abs().max() < 1e-3


def test_dopri5_ends_on_a_tiny_last_step():
    """A solve whose last accepted step ended 5e-15 before t_1 took a 5e-15 remainder and raised "underflow"."""
    x = torch.zeros(1, 1, dtype=torch.float64)
    solution = odeint(lambda t, x: torch.zeros_like(x), x, [0.0, 0.111111 + 5e-15], method="dopri5")
    assert torch.equal(solution.x, x)


def test_dopri5_on_a_long_span_from_rest():
    """From x = 0 the first step was 1e-6 time units, under the underflow bound 1e-12 · span for spans over 1e6:
    dx/dt = 1e-8 (1 - x) over [0, 3e8] raised (torchdiffeq: 0.950212)."""
    x = torch.zeros(2, 1, dtype=torch.float64)
    solution = odeint(lambda t, x: 1e-8 * (1 - x), x, [0.0, 3e8], method="dopri5", rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(solution.x, torch.full_like(x, 1 - math.exp(-3.0)), atol=1e-5, rtol=0)
