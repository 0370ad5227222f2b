"""What the fused ops' autograd Functions share."""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = ["first_order", "traced"]


def first_order(backward):
    """Mark a Function's backward as first order only: under `create_graph=True` (second derivatives: Hessians,
    gradient penalties) it raises instead of returning a gradient whose own derivative would be silently missing
    (`once_differentiable` hangs its error off detached leaves, which `torch.autograd.grad(..., inputs=x)` skips)."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{backward.__qualname__.split('.')[0].lstrip('_')}: the fused kernels' gradients are first order only "
                "(create_graph=True, e.g. a Hessian or a gradient penalty); use backend='reference'")
        return backward(ctx, *grads)

    return checked


def traced(*tensors: torch.Tensor) -> bool:
    """Whether a trace may be watching `tensors` (torch.compile, make_fx, a dispatch mode, fake or functional
    tensors): then the native spline must run as its torch.library custom ops, which traces record. Eager calls
    skip the ops' dispatch (~25-80 µs a call, ~10 % of a 256-row spline-flow training step)."""
    return (torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
            or any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors))
