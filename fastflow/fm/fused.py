"""Fixed-step sampling ODE of a `VelocityMLP` as one fused Triton kernel (kernels/ode.py), with
`odeint` on the same field as its reference.

`mlp_odeint` is forward only (sampling runs under `torch.no_grad()`): the kernel keeps no graph, so
it refuses inputs that would need one. With `trajectory=True` (the states at every time of the grid) the
kernel runs one launch per step, each a one-step grid.

Tolerances against the reference (float32): exact fp32 products in the kernel (`precision="ieee"`, and
always under TRITON_INTERPRET=1), summed in another order, agree to ~1e-6 relative per evaluation;
`precision="tf32"` (used when `torch.backends.cuda.matmul.allow_tf32` is set) rounds the matmul inputs to
10-bit mantissas, ~1e-3 relative per evaluation, and on an NVIDIA GPU evaluates SiLU/tanh through the hardware's
approximate tanh (`kernels.activations`, ~2^-11 relative, within that error).

With `bf16=True` the hidden layers multiply bfloat16 operands (each hidden layer's input and weights rounded to
bfloat16, float32 sums; the first and output layers and the state stay float32, their products TF32 by default); its
reference is `odeint` on `bf16_hidden_field`, which rounds the same operands in float32 arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastflow.backends import AUTO_TRITON_PRECISIONS, is_automatic, requested_backend, resolve_backend, triton_precision
from fastflow.fm.nets import VelocityMLP, plain_velocity_mlp
from fastflow.fm.solvers import SOLVERS, OdeSolution, _check_times, _stage_times, checked_finite, odeint

__all__ = ["bf16_hidden_field", "fused_unsupported", "mlp_odeint"]

# mirrors kernels/ode.py (not imported here: Triton loads only when the Triton backend runs)
_ACTIVATIONS = ("silu", "tanh", "gelu", "relu")
_MAX_HIDDEN, _MAX_LAYERS, _MAX_STAGES, _MAX_STATE_DIM = 256, 4, 4, 256


def fused_unsupported(velocity: torch.nn.Module, x: torch.Tensor, method: str,
                      context: torch.Tensor | None = None) -> str | None:
    """Why the fused kernel cannot integrate this field and these inputs, or None when it can."""
    if not plain_velocity_mlp(velocity):
        return f"the velocity is a {type(velocity).__name__}, not a VelocityMLP as built (no overridden forward, no hooks)"
    tableau = SOLVERS.get(method)
    if tableau is None or tableau.adaptive or len(tableau.b) > _MAX_STAGES:
        return f"method {method!r} is not a fixed-step method of at most {_MAX_STAGES} stages (euler, midpoint, heun, rk4)"
    widths = [layer.out_features for layer in velocity.layers]
    if len(set(widths)) != 1:
        return f"hidden widths {tuple(widths)} are not all equal"
    if len(widths) > _MAX_LAYERS or widths[0] > _MAX_HIDDEN:
        return f"{len(widths)} hidden layers of width {widths[0]}: the kernel takes at most {_MAX_LAYERS} of width <= {_MAX_HIDDEN}"
    if velocity.dim > _MAX_STATE_DIM:
        return f"state dimension {velocity.dim} > {_MAX_STATE_DIM}"
    if velocity.activation not in _ACTIVATIONS:
        return f"activation {velocity.activation!r} is not one of {_ACTIVATIONS}"
    if velocity.residual and velocity.layers[0].in_features == widths[0]:
        return "residual first layer (its input width equals the hidden width)"
    tensors = [x, *velocity.parameters(), *(() if context is None else (context,))]
    if any(t.dtype != torch.float32 for t in tensors):
        return f"dtypes {sorted({str(t.dtype) for t in tensors})}: the kernel runs float32 only"
    if not x.is_contiguous() or (context is not None and not context.is_contiguous()):
        return "non-contiguous state or context"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "inputs require grad: the kernel is forward only (sample under torch.no_grad())"
    return None


def bf16_hidden_field(velocity: VelocityMLP):
    """`velocity` as the fused kernel's bf16 mode computes it, in PyTorch (its reference): `(t, x_t (n, D)[, context])
    -> (n, D)` with each hidden layer's input and weights rounded to bfloat16 and their products summed in the field's
    dtype (exact products of 8-bit mantissas); the first and output layers as they are. A residual adds the rounded
    input (as `VelocityMLP.forward`, where the widths agree)."""
    rounded = [layer.weight.bfloat16().to(layer.weight.dtype) for layer in velocity.layers[1:]]

    def field(t, x_t, context=None):
        h = velocity.inputs(t, x_t, context)
        for index, layer in enumerate(velocity.layers):
            if index:
                h = h.bfloat16().to(h.dtype)
            out = velocity.act(F.linear(h, rounded[index - 1], layer.bias) if index else layer(h))
            h = h + out if velocity.residual and out.shape == h.shape else out
        return velocity.output(h)

    return field


def mlp_odeint(velocity: VelocityMLP, x: torch.Tensor, times, method: str = "rk4", *,
               context: torch.Tensor | None = None, backend: str | None = "auto",
               precision: str | None = None, bf16: bool = False, launch: dict | None = None,
               trajectory: bool = False) -> OdeSolution:
    """`odeint(velocity, x, times, method=method, args=(context,))` through the chosen backend.

    Arguments:
        velocity: the field v(t, x (n, D)[, context (n, E)]).
        x: `(n, D)` initial states at times[0].
        times: strictly monotone grid `(K + 1,)` (forward or backward); one step per interval.
        method: "euler", "midpoint", "heun" or "rk4".
        context: `(n, E)`, or `(E,)` for one context shared by all samples (the kernel folds it into the
            first layer's time bias), for a conditional field; else None.
        backend: "reference" (odeint), "triton" (fused kernel; unsupported inputs raise ValueError), or
            "auto"/None: Triton for supported float32 CUDA inputs whose products are TF32 (`precision`,
            `fastflow.backends.AUTO_TRITON_PRECISIONS`) or bfloat16 (`bf16`), the reference otherwise.
        precision: the kernel's matmul precision, "ieee", "tf32" or "tf32x3" (with `bf16`: of the first and output
            layers); None follows `torch.backends.cuda.matmul.allow_tf32` on CUDA ("ieee" on CPU), or with `bf16`
            is "tf32" on CUDA.
        bf16: the hidden layers' products on bfloat16 operands, float32 sums (the reference: `odeint` on
            `bf16_hidden_field(velocity)`); the automatic choice then takes the kernel wherever it runs.
        launch: the kernel's settings for tuning (`approximate`, `resident`, `block_m`, `block_k`, `num_warps` of
            `kernels.ode.mlp_odeint_triton`); None: its defaults.
        trajectory: also return the states at every time of the grid `(K + 1, n, D)` (the fused kernel then
            runs one launch per step).

    Returns:
        `OdeSolution` with the final states `(n, D)` and the number of batched velocity evaluations.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (n, D) tensor, got {getattr(x, 'shape', type(x))}")
    if isinstance(velocity, VelocityMLP) and x.shape[1] != velocity.dim:
        raise ValueError(f"x must be (n, {velocity.dim}), got {tuple(x.shape)}")
    if method not in SOLVERS:
        raise ValueError(f"unknown ODE method {method!r}; known: {sorted(SOLVERS)}")
    devices = {t.device for t in (x, *velocity.parameters(), *(() if context is None else (context,)))}
    if len(devices) != 1:
        raise ValueError(f"state, context and velocity parameters must be on one device, got {sorted(map(str, devices))}")
    if isinstance(velocity, VelocityMLP) and (context is None) != (velocity.context_dim == 0):
        raise ValueError(f"this velocity field needs {'a context' if velocity.context_dim else 'no context'}")
    if context is not None:
        if context.dim() not in (1, 2) or (context.dim() == 2 and context.shape[0] != x.shape[0]) or (
                isinstance(velocity, VelocityMLP) and context.shape[-1] != velocity.context_dim):
            raise ValueError(f"context must be (E,) or (n = {x.shape[0]}, E) with E = {getattr(velocity, 'context_dim', 'E')}, "
                             f"got {tuple(context.shape)}")
    for name, flag in (("trajectory", trajectory), ("bf16", bf16)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if bf16 and not plain_velocity_mlp(velocity):
        raise ValueError(f"bf16 products are for a VelocityMLP as built, not a {type(velocity).__name__}")
    grid = _check_times(times)
    if not torch.isfinite(x).all():
        raise ValueError("the initial state contains NaN or inf")
    # (the precision is checked on every path: a bad one passed under autograd)
    resolved_precision = "tf32" if bf16 and precision is None and x.is_cuda else triton_precision(precision, x.device)
    reason = fused_unsupported(velocity, x, method, context)
    if requested_backend(backend) == "triton" and reason is not None:  # named here or by FASTFLOW_BACKEND
        raise ValueError(f"the fused Triton ODE kernel cannot run this: {reason}; use backend='reference' (odeint) instead")
    if is_automatic(backend) and reason is None and not bf16 and resolved_precision not in AUTO_TRITON_PRECISIONS:
        reason = "fp32 products: the reference is faster (automatic choice only)"
    chosen = resolve_backend(backend, x.device, supports=("reference",) if reason else ("reference", "triton"))
    if chosen == "triton":
        return _fused(velocity, x, grid, method, context, resolved_precision, bf16, launch or {}, trajectory)
    if context is not None and context.dim() == 1:
        context = context.expand(x.shape[0], -1)
    return odeint(bf16_hidden_field(velocity) if bf16 else velocity, x, times, method=method,
                  args=() if context is None else (context,), trajectory=trajectory)


def _fused(velocity: VelocityMLP, x, grid: list[float], method: str, context, precision: str, bf16: bool,
           launch: dict, trajectory: bool) -> OdeSolution:
    """Pack the field (first-layer time and context terms precomputed) and launch the kernel: once for the whole
    grid, or once per step for a trajectory."""
    from fastflow.kernels.ode import mlp_odeint_triton

    tableau = SOLVERS[method]
    first = velocity.layers[0]
    n_time = velocity.time_embedding.dim
    w_time, w_x, w_context = first.weight.split([n_time, velocity.dim, velocity.context_dim], dim=1)
    stage_times = _stage_times(grid, tableau.c, torch.float32).reshape(-1).to(x.device)  # as odeint evaluates
    steps = torch.tensor(grid[1:], dtype=torch.float64) - torch.tensor(grid[:-1], dtype=torch.float64)
    time_bias = F.linear(velocity.time_embedding(stage_times), w_time, first.bias)
    context_bias = None if context is None else F.linear(context, w_context)
    if context_bias is not None and context_bias.dim() == 1:  # one context for all samples: a time-bias term
        time_bias, context_bias = time_bias + context_bias, None
    hidden = velocity.layers[1:]
    width = first.out_features
    w_hidden = torch.stack([layer.weight for layer in hidden]) if hidden else x.new_empty(0, width, width)
    b_hidden = torch.stack([layer.bias for layer in hidden]) if hidden else x.new_empty(0, width)
    steps, time_bias = steps.float().to(x.device), time_bias.contiguous()
    weights = (w_x.contiguous(), w_hidden.contiguous(), b_hidden.contiguous(), velocity.output.weight.contiguous(),
               velocity.output.bias.contiguous())

    def integrate(start, steps, time_bias):
        return mlp_odeint_triton(start, steps, time_bias, context_bias, *weights, a=tableau.a, b=tableau.b,
                                 activation=velocity.activation, residual=velocity.residual, precision=precision,
                                 bf16=bf16, **launch)

    evaluations = len(tableau.b) * (len(grid) - 1)
    if not trajectory:
        return OdeSolution(checked_finite(integrate(x, steps, time_bias), method), evaluations=evaluations)
    stages = len(tableau.b)
    states = [x]
    for k in range(len(grid) - 1):
        states.append(integrate(states[-1], steps[k : k + 1], time_bias[k * stages : (k + 1) * stages]))
    return OdeSolution(checked_finite(states[-1], method), evaluations=evaluations, trajectory=torch.stack(states))
