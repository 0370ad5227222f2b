"""What the fused ops' autograd Functions share."""

from __future__ import annotations

import functools

import torch

__all__ = ["first_order"]


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
