"""Affine coupling as one op: conditioner MLP on [kept, context], affine transform of the changed half,
log|det J|. `affine_coupling_ref` is the PyTorch reference; the Triton path (kernels/coupling.py) fuses
the whole layer in the forward pass and differentiates by recomputing through the reference."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastflow.backends import resolve_backend

__all__ = ["affine_coupling", "affine_coupling_ref"]


def affine_coupling_ref(
    kept: torch.Tensor,
    context: torch.Tensor | None,
    changed: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    *,
    scale_bound: float,
    inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference affine coupling.

    Arguments:
        kept `(N, K)`: coordinates that pass through and parametrize the transform.
        context `(N, C)` or None; changed `(N, T)`: the coordinates transformed.
        weights: (w1, b1, …, w_last, b_last) of the conditioner's linear layers (SiLU between them);
            the last layer's `2T` outputs are (raw log-scale, shift) per changed coordinate.
        scale_bound: log-scales are bound·tanh(raw / bound).
    Returns:
        out `(N, T)` and log|det J| `(N,)` of the map applied (the inverse's when `inverse`).
    """
    h = kept if context is None else torch.cat([kept, context.to(kept.dtype)], dim=1)
    for layer in range(0, len(weights) - 2, 2):
        h = F.silu(F.linear(h, weights[layer], weights[layer + 1]))
    params = F.linear(h, weights[-2], weights[-1]).view(changed.shape[0], changed.shape[1], 2)
    raw_scale, shift = params.unbind(-1)
    log_scale = scale_bound * torch.tanh(raw_scale / scale_bound)
    if inverse:
        return (changed - shift) * torch.exp(-log_scale), -log_scale.sum(-1)
    return changed * torch.exp(log_scale) + shift, log_scale.sum(-1)


def affine_coupling(kept, context, changed, weights, *, scale_bound: float, inverse: bool, backend: str | None = None):
    """`affine_coupling_ref` through the backend chosen by `fastflow.backends.resolve_backend`.

    The Triton kernel covers float32 and conditioners with two hidden layers; other inputs support
    only the reference (forcing `triton` for them raises).
    """
    tensors = [kept, changed, *weights] + ([] if context is None else [context])
    if len({t.device for t in tensors}) != 1:
        raise ValueError("affine_coupling: inputs and weights must be on one device")
    fusable = len(weights) == 6 and all(t.dtype == torch.float32 for t in tensors)
    triton_device = kept.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    supports = ("reference", "triton") if fusable and triton_device else ("reference",)
    if resolve_backend(backend, kept.device, supports=supports) == "triton":
        return _FusedAffineCoupling.apply(kept, context, changed, scale_bound, inverse, *weights)
    return affine_coupling_ref(kept, context, changed, weights, scale_bound=scale_bound, inverse=inverse)


class _FusedAffineCoupling(torch.autograd.Function):
    """Triton forward; backward recomputes the layer with the reference and differentiates it."""

    @staticmethod
    def forward(ctx, kept, context, changed, scale_bound, inverse, *weights):
        from fastflow.kernels.coupling import affine_coupling_triton

        ctx.save_for_backward(kept, changed, *weights, *(() if context is None else (context,)))
        ctx.has_context, ctx.scale_bound, ctx.inverse = context is not None, scale_bound, inverse
        return affine_coupling_triton(kept, context, changed, weights, scale_bound=scale_bound, inverse=inverse)

    @staticmethod
    def backward(ctx, grad_out, grad_ladj):
        saved = ctx.saved_tensors
        kept, changed, weights = saved[0], saved[1], saved[2:8]
        context = saved[8] if ctx.has_context else None
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in (kept, changed, *weights)]
        context_input = None if context is None else context.detach().requires_grad_(context.requires_grad)
        with torch.enable_grad():
            out, ladj = affine_coupling_ref(
                inputs[0], context_input, inputs[1], tuple(inputs[2:]), scale_bound=ctx.scale_bound, inverse=ctx.inverse
            )
            wanted = [t for t in [*inputs, context_input] if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad((out, ladj), wanted, (grad_out, grad_ladj), allow_unused=True))
        kept_g, changed_g, *weight_g = [next(grads) if t.requires_grad else None for t in inputs]
        context_g = next(grads) if context_input is not None and context_input.requires_grad else None
        return (kept_g, context_g, changed_g, None, None, *weight_g)
