"""Velocity networks v(t, x_t[, context]): an MLP on [Fourier features of t, x_t, context]."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastflow._checks import nonnegative_int, positive_int
from fastflow.fm.solvers import per_sample_times
from fastflow.ops.linear import BLOCK_ROWS, linear_silu_into, native_linear_silu_runs

__all__ = ["ACTIVATIONS", "TimeEmbedding", "VelocityMLP", "plain_velocity_mlp"]

ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}
# in-place forms, used when no graph is recorded (sampling): they skip one activation-sized allocation per layer
# (SiLU on CPU runs natively instead: `VelocityMLP._native_blocks`)
_IN_PLACE = {"silu": partial(F.silu, inplace=True), "tanh": torch.tanh_, "relu": partial(F.relu, inplace=True)}


class TimeEmbedding(nn.Module):
    """t `(n,)` → `(n, 1 + 2F)`: [t, sin(π k t), cos(π k t)] for k = 1..F."""

    def __init__(self, num_frequencies: int = 4):
        super().__init__()
        num_frequencies = nonnegative_int(num_frequencies, "num_frequencies")
        self.register_buffer("frequencies", math.pi * torch.arange(1, num_frequencies + 1, dtype=torch.float32))
        self.dim = 1 + 2 * num_frequencies

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t.unsqueeze(-1)
        angles = t * self.frequencies.to(t.dtype)
        return torch.cat([t, angles.sin(), angles.cos()], -1)


class VelocityMLP(nn.Module):
    """MLP velocity field v(t, x_t, context) `(n, D)`.

    Arguments:
        dim: D, the state dimension.
        context_dim: dimension of the (embedded) context, 0 for an unconditional field.
        hidden: widths of the hidden layers.
        activation: "silu", "tanh", "gelu" or "relu".
        num_frequencies: Fourier features of t (see `TimeEmbedding`).
        residual: add each hidden layer's input to its output where the widths agree.
    """

    def __init__(self, dim: int, *, context_dim: int = 0, hidden: tuple[int, ...] = (128, 128, 128),
                 activation: str = "silu", num_frequencies: int = 4, residual: bool = False):
        super().__init__()
        dim, context_dim = positive_int(dim, "dim"), nonnegative_int(context_dim, "context_dim")
        if not hidden:
            raise ValueError(f"hidden must be a non-empty tuple of positive widths, got {hidden!r}")
        hidden = tuple(positive_int(width, "each hidden width") for width in hidden)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        self.dim, self.context_dim, self.residual, self.activation = dim, context_dim, residual, activation
        self.time_embedding = TimeEmbedding(num_frequencies)
        widths = (self.time_embedding.dim + dim + context_dim, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = ACTIVATIONS[activation]()
        self.output = nn.Linear(widths[-1], dim)

    def forward(self, t: torch.Tensor, x_t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """t scalar, `(n,)` or `(n, 1)`, x_t `(n, D)`, context `(n, E)` or `(E,)` → `(n, D)`."""
        h = self.inputs(t, x_t, context)
        sampling = not torch.is_grad_enabled()
        if sampling and self.activation == "silu" and native_linear_silu_runs(h):
            return self._native_blocks(h)
        act = _IN_PLACE.get(self.activation, self.act) if sampling else self.act
        for layer in self.layers:
            out = act(layer(h))
            h = h + out if self.residual and out.shape == h.shape else out
        return self.output(h)

    def inputs(self, t: torch.Tensor, x_t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The first layer's input `(n, 1 + 2F + D + E)`: [time features, x_t, context] (x_t at `x_columns`),
        after checking t scalar, `(n,)` or `(n, 1)` (adaptive solvers' per-sample times), x_t `(n, D)` in the field's
        dtype, context `(n, E)` or `(E,)`."""
        if x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t must be (n, {self.dim}), got {tuple(x_t.shape)}")
        if x_t.dtype != self.output.weight.dtype:
            raise ValueError(f"x_t is {x_t.dtype} but the field's parameters are {self.output.weight.dtype} "
                             "(convert one with .to())")
        n = x_t.shape[0]
        inputs = [self.time_embedding(per_sample_times(t, n, x_t).expand(n)), x_t]
        if self.context_dim:
            if context is None or context.dim() not in (1, 2) or context.shape[-1] != self.context_dim or (
                    context.dim() == 2 and context.shape[0] != n):
                raise ValueError(f"this field needs a context ({self.context_dim},) or ({n}, {self.context_dim}), got "
                                 f"{None if context is None else tuple(context.shape)}")
            inputs.append(context.to(x_t.dtype).expand(n, self.context_dim))
        elif context is not None:
            raise ValueError("this velocity field is unconditional: pass no context")
        return torch.cat(inputs, -1)

    @property
    def x_columns(self) -> slice:
        """Where x_t sits in `inputs`."""
        return slice(self.time_embedding.dim, self.time_embedding.dim + self.dim)

    def _native_blocks(self, h: torch.Tensor) -> torch.Tensor:
        """The layers on `h (n, in)` → `(n, D)` without autograd on CPU, SiLU layers native (`linear_silu_into`),
        by blocks of `BLOCK_ROWS` rows (cache-resident activations) through one buffer per layer."""
        n = h.shape[0]
        result = h.new_empty(n, self.dim)
        buffers = [h.new_empty(min(n, BLOCK_ROWS), layer.out_features) for layer in self.layers]
        for start in range(0, n, BLOCK_ROWS):
            rows = slice(start, min(n, start + BLOCK_ROWS))
            x = h[rows]
            for layer, buffer in zip(self.layers, buffers):
                out = linear_silu_into(x, layer.weight, layer.bias, buffer[: rows.stop - start])
                x = out.add_(x) if self.residual and out.shape == x.shape else out
            torch.addmm(self.output.bias, x, self.output.weight.t(), out=result[rows])
        return result


def plain_velocity_mlp(field: nn.Module) -> bool:
    """Whether `field` computes exactly what `VelocityMLP.forward` computes from its layers (no subclass `forward`,
    no hooks): then the kernels that rebuild it from its layers (the forward-mode divergence, the fused ODE
    integrator) may stand in for calling it."""
    return (isinstance(field, VelocityMLP) and type(field).forward is VelocityMLP.forward
            and not (field._forward_hooks or field._forward_pre_hooks))
