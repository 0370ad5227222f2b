"""Velocity networks v(t, x_t[, context]): an MLP on [Fourier features of t, x_t, context]."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastflow._checks import nonnegative_int, positive_int
from fastflow.fm.solvers import per_sample_times
from fastflow.ops.linear import BLOCK_ROWS

__all__ = ["ACTIVATIONS", "SamplingField", "TimeEmbedding", "VelocityMLP", "plain_velocity_mlp"]

ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}
# in-place forms, used when no graph is recorded (sampling): they skip one activation-sized allocation per layer
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


class SamplingField:
    """A velocity field prepared for sampling solves (`VelocityMLP.sampling_field`): called as
    `(t, x_t (n, D), *args) -> (n, D)`, where `args` (the per-row tensors `(n, ...)` it was built with, empty where it
    holds none) go to `odeint(field, x, times, args=field.args)`, which slices them with the state; called without
    them, it uses its own."""

    def __init__(self, field, args: tuple):
        self.field, self.args = field, args

    def __call__(self, t, x_t: torch.Tensor, *args) -> torch.Tensor:
        return self.field(t, x_t, *(args or self.args))


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
        t, context = self._checked(t, x_t, context)
        if not torch.is_grad_enabled() and self._runs_blocks(x_t):
            context_term = None if context is None else F.linear(context, self._w_context)
            return self._blocks(x_t, *self._first_layer_terms(t, context_term))
        act = _IN_PLACE.get(self.activation, self.act) if not torch.is_grad_enabled() else self.act
        h = self._concatenated(t, x_t, context)
        for layer in self.layers:
            out = act(layer(h))
            h = h + out if self.residual and out.shape == h.shape else out
        return self.output(h)

    def inputs(self, t: torch.Tensor, x_t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The first layer's input `(n, 1 + 2F + D + E)`: [time features, x_t, context] (x_t at `x_columns`),
        after checking t scalar, `(n,)` or `(n, 1)` (adaptive solvers' per-sample times), x_t `(n, D)` in the field's
        dtype, context `(n, E)` or `(E,)`."""
        t, context = self._checked(t, x_t, context)
        return self._concatenated(t, x_t, context)

    def sampling_field(self, context: torch.Tensor | None = None, *, bf16: bool = False) -> "SamplingField":
        """The field as a sampling ODE solve on CPU calls it, without autograd: `forward(t, x_t, context)` with the
        first layer's context term computed once (context `(n, E)` or `(E,)`, fixed for the solve) and, with `bf16`,
        the hidden layers' products in bfloat16 (their weights cast once; the first layer, the output layer and the
        state stay in the field's dtype: 2e-3 to 5e-3 of the largest |v| off for 4 hidden layers of 128, and 1.4-1.5x
        faster on a CPU with bfloat16 products). Other devices, or a residual first layer: `forward` itself (bf16
        refused there). Solve with `odeint(field, x, times, args=field.args)`: a per-row context's term travels in
        `args`, so that adaptive solves slice it with the state."""
        if self.context_dim or context is not None:
            self._checked_context(context, None)
        weight = self.output.weight
        if not self._runs_blocks(weight):
            if bf16:
                raise ValueError("bfloat16 sampling_field runs on CPU float32/float64 fields without a residual first layer")
            rows = context  # (forward takes the context itself)

            def field(t, x_t, context=context):
                return self(t, x_t, context)
        else:
            with torch.no_grad():  # (no graph kept to the parameters)
                rows = None if context is None else F.linear(context.to(weight.dtype), self._w_context)
                low = [(layer.weight.bfloat16(), layer.bias.bfloat16()) for layer in self.layers[1:]] if bf16 else None

            @torch.no_grad()
            def field(t, x_t, context_term=rows):
                t = self._checked_times(t, x_t)
                if context_term is not None and context_term.dim() == 2 and context_term.shape[0] != x_t.shape[0]:
                    raise ValueError(f"this field's context has {context_term.shape[0]} rows, x_t {x_t.shape[0]}")
                return self._blocks(x_t, *self._first_layer_terms(t, context_term), low_precision=low)

        return SamplingField(field, (rows,) if rows is not None and rows.dim() == 2 else ())

    def _checked(self, t, x_t: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(t as a 0-d or `(n,)` tensor, context `(n, E)`, `(E,)` or None in x_t's dtype) after checking them
        (`inputs`)."""
        t = self._checked_times(t, x_t)
        if self.context_dim or context is not None:
            context = self._checked_context(context, x_t.shape[0]).to(x_t.dtype)
        return t, context

    def _checked_times(self, t, x_t: torch.Tensor) -> torch.Tensor:
        """t as a 0-d or `(n,)` tensor after checking x_t `(n, D)` in the field's dtype and t."""
        if x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t must be (n, {self.dim}), got {tuple(x_t.shape)}")
        if x_t.dtype != self.output.weight.dtype:
            raise ValueError(f"x_t is {x_t.dtype} but the field's parameters are {self.output.weight.dtype} "
                             "(convert one with .to())")
        return per_sample_times(t, x_t.shape[0], x_t)

    def _checked_context(self, context: torch.Tensor | None, n: int | None) -> torch.Tensor:
        """context `(E,)` or `(n, E)` (any n where n is None) for a conditional field; a context for an unconditional
        one raises."""
        if not self.context_dim:
            raise ValueError("this velocity field is unconditional: pass no context")
        rows = "n" if n is None else n
        if context is None or context.dim() not in (1, 2) or context.shape[-1] != self.context_dim or (
                context.dim() == 2 and n is not None and context.shape[0] != n):
            raise ValueError(f"this field needs a context ({self.context_dim},) or ({rows}, {self.context_dim}), got "
                             f"{None if context is None else tuple(context.shape)}")
        return context

    def _concatenated(self, t: torch.Tensor, x_t: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        n = x_t.shape[0]
        inputs = [self.time_embedding(t.expand(n)), x_t]
        if context is not None:
            inputs.append(context.expand(n, self.context_dim))
        return torch.cat(inputs, -1)

    @property
    def x_columns(self) -> slice:
        """Where x_t sits in `inputs`."""
        return slice(self.time_embedding.dim, self.time_embedding.dim + self.dim)

    @property
    def _w_context(self) -> torch.Tensor:
        """The first layer's context columns `(H, E)`."""
        return self.layers[0].weight[:, self.x_columns.stop:]

    def _runs_blocks(self, like: torch.Tensor) -> bool:
        """Whether the no-grad layers run by blocks of rows (`_blocks`) for tensors like `like`: CPU float32/float64,
        no caller's autocast (the layers then take its dtype), and no residual first layer (its input is never built
        there)."""
        first = self.layers[0]
        return (like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu") and not (self.residual and first.in_features == first.out_features))

    def _first_layer_terms(self, t: torch.Tensor, context_term: torch.Tensor | None):
        """The first layer's pre-activation less its x_t product, split as (per-row term `(n, H)` or None, shared term
        `(H,)`): the bias and the time features' product of t (0-d: shared; `(n,)`: per row), and the context's
        product `context_term` (`(E,)`-context: `(H,)`, shared; else `(n, H)`)."""
        first = self.layers[0]
        w_time = first.weight[:, : self.time_embedding.dim]
        if t.dim() == 0:
            rows, shared = None, F.linear(self.time_embedding(t.reshape(1)), w_time, first.bias).reshape(-1)
        else:
            rows, shared = F.linear(self.time_embedding(t), w_time), first.bias
        if context_term is not None:
            if context_term.dim() == 1:
                shared = shared + context_term
            else:
                rows = context_term if rows is None else rows + context_term
        return rows, shared

    def _blocks(self, x_t: torch.Tensor, rows_term: torch.Tensor | None, shared_term: torch.Tensor,
                low_precision: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """The layers without autograd on CPU by blocks of `BLOCK_ROWS` rows (cache-resident activations, one buffer
        per layer): the first layer from x_t `(n, D)` and its other terms (`_first_layer_terms`), activations in
        place; with `low_precision` (each hidden layer's bfloat16 weight and bias) the hidden layers multiply in
        bfloat16. Returns `(n, D)`."""
        n = x_t.shape[0]
        first, hidden = self.layers[0], self.layers[1:]
        act = _IN_PLACE.get(self.activation, self.act)
        w_x = first.weight[:, self.x_columns].t()
        result = x_t.new_empty(n, self.dim)
        buffered = self.layers if low_precision is None else [first]  # (bfloat16 layers allocate their outputs)
        buffers = [x_t.new_empty(min(n, BLOCK_ROWS), layer.out_features) for layer in buffered]
        for start in range(0, n, BLOCK_ROWS):
            stop = min(n, start + BLOCK_ROWS)
            h = buffers[0][: stop - start]
            if rows_term is None:
                h = act(torch.addmm(shared_term, x_t[start:stop], w_x, out=h))
            else:
                h = act(torch.addmm(rows_term[start:stop], x_t[start:stop], w_x, out=h).add_(shared_term))
            if low_precision is not None:
                h = h.bfloat16()
            for index, layer in enumerate(hidden):
                if low_precision is not None:
                    out = act(F.linear(h, *low_precision[index]))
                else:
                    out = act(torch.addmm(layer.bias, h, layer.weight.t(), out=buffers[index + 1][: stop - start]))
                h = out.add_(h) if self.residual and out.shape == h.shape else out
            torch.addmm(self.output.bias, h.to(result.dtype), self.output.weight.t(), out=result[start:stop])
        return result


def plain_velocity_mlp(field: nn.Module) -> bool:
    """Whether `field` computes exactly what `VelocityMLP.forward` computes from its layers (no subclass `forward`,
    no hooks): then the kernels that rebuild it from its layers (the forward-mode divergence, the fused ODE
    integrator) may stand in for calling it."""
    return (isinstance(field, VelocityMLP) and type(field).forward is VelocityMLP.forward
            and not (field._forward_hooks or field._forward_pre_hooks))
