"""Divergence of a velocity field, div_x v(t, x) = tr(∂v/∂x), for the augmented ODE of a CNF's log-likelihood:
exact, or Hutchinson's unbiased estimate E_ε[εᵀ (∂v/∂x) ε] (FFJORD, Grathwohl et al. 2019).

For a `VelocityMLP` both run forward-mode through its layers (`mlp_divergence`): the Jacobian-vector products
J ε_p are carried layer by layer beside the activations, a block of rows at a time so that they stay in cache,
one GEMM `(rows · P, width) x (width, width)` per hidden layer for P tangents (P = D for the exact trace). Other
fields go through autograd, the references (`exact_divergence`: one vector-Jacobian product per dimension;
`hutchinson_divergence`: one per probe). Everything is differentiable in grad mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from fastflow._checks import positive_int
from fastflow.backends import autograd_recording
from fastflow.fm.nets import VelocityMLP, plain_velocity_mlp

__all__ = [
    "DIVERGENCES", "DeterministicDivergence", "Divergence", "ExactDivergence", "HutchinsonDivergence", "as_divergence",
    "exact_divergence", "hutchinson_divergence", "mlp_divergence",
]

# tangents per block, rows · P · width: on CPU 1 MB in float32, cache-resident (d = 10, width 128, 10^4 rows: 146 ms
# an evaluation at 2^18, 154 at 2^17, 159 at 2^19, 183 for the three hidden GEMMs unblocked); on GPUs large blocks
CPU_BLOCK_ELEMENTS, GPU_BLOCK_ELEMENTS = 1 << 18, 1 << 26

Velocity = Callable[..., torch.Tensor]


def _with_graph(velocity: Velocity, t: torch.Tensor, x: torch.Tensor, args, reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """v = velocity(t, x, *args) and `reduce(v, x_in)` with x_in recording a graph, also under no_grad /
    inference_mode (a plain copy of x records there); detached unless grad mode was on."""
    differentiable = torch.is_grad_enabled()
    with autograd_recording():
        # an inference tensor records no graph (x's divergence came back 0) and cannot be saved for the backward
        # pass (a field t * x failed on the solver's times): plain copies
        x, t, *args = (_recordable(a) for a in (x, t, *args))
        x_in = x if (differentiable and x.requires_grad) else x.detach().requires_grad_(True)
        v = velocity(t, x_in, *args)
        div = reduce(v, x_in, differentiable) if v.requires_grad else x.new_zeros(x.shape[0])
    return (v, div) if differentiable else (v.detach(), div.detach())


def _recordable(value):
    """An inference tensor as a plain copy (autograd can record and save it); anything else as it is."""
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def exact_divergence(velocity: Velocity, t: torch.Tensor, x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference exact divergence by autograd: `(v (n, D), div (n,))`, one vector-Jacobian product per
    dimension (D backward passes); zero where v does not depend on x."""
    def trace(v, x_in, differentiable):
        div = x.new_zeros(x.shape[0])
        for i in range(x.shape[1]):
            row, = torch.autograd.grad(v[:, i].sum(), x_in, create_graph=differentiable, retain_graph=True,
                                       allow_unused=True)
            if row is not None:
                div = div + row[:, i]
        return div

    return _with_graph(velocity, t, x, args, trace)


def hutchinson_divergence(velocity: Velocity, t: torch.Tensor, x: torch.Tensor, *args,
                          probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference Hutchinson estimate by autograd: `(v (n, D), mean_p ε_pᵀ (∂v/∂x) ε_p (n,))` for probes
    `(n, P, D)`, one vector-Jacobian product per probe."""
    _check_probes(probes, x)

    def estimate(v, x_in, differentiable):
        div = x.new_zeros(x.shape[0])
        for p in range(probes.shape[1]):
            row, = torch.autograd.grad(v, x_in, probes[:, p], create_graph=differentiable, retain_graph=True,
                                       allow_unused=True)
            if row is not None:
                div = div + (row * probes[:, p]).sum(-1)
        return div / probes.shape[1]

    return _with_graph(velocity, t, x, args, estimate)


def _check_probes(probes: torch.Tensor, x: torch.Tensor) -> None:
    """Probes must be `(n, P >= 1, D)` for x `(n, D)`, in its dtype and on its device."""
    n, dim = x.shape
    if probes.dim() != 3 or probes.shape[0] != n or probes.shape[1] == 0 or probes.shape[2] != dim:
        raise ValueError(f"probes must be ({n}, P >= 1, {dim}), got {tuple(probes.shape)}")
    if probes.dtype != x.dtype or probes.device != x.device:
        raise ValueError(f"probes must be {x.dtype} on {x.device} as x, got {probes.dtype} on {probes.device}")


def _activation_and_slope(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """σ(z) and σ'(z), elementwise, for the activations of `VelocityMLP`."""
    if activation == "silu":
        s = torch.sigmoid(z)
        a = z * s
        return a, torch.addcmul(s, a, 1 - s)  # s (1 + z (1 - s))
    if activation == "tanh":
        a = torch.tanh(z)
        return a, 1 - a * a
    if activation == "gelu":  # nn.GELU(): z Φ(z), slope Φ(z) + z φ(z)
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
        return z * cdf, cdf + z * torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
    if activation == "relu":
        return torch.relu(z), (z > 0).to(z.dtype)
    raise ValueError(f"no slope for activation {activation!r}")


def _mlp_block(field: VelocityMLP, h: torch.Tensor, probes: torch.Tensor | None,
               w_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v `(b, D)` and the divergence `(b,)` of `field` on inputs h `(b, in)`: tangents J ε_p `(b, P, width)`
    carried through the layers; exact for probes None (ε_p = e_p, P = D), else mean_p over probes `(b, P, D)`;
    w_x `(D, width)`: the first layer's weights on x, transposed."""
    columns, in_place = field.x_columns, not torch.is_grad_enabled()  # (no graph to keep dz for)
    tangent = None  # ∂h/∂x ε_p for the current h; None for the inputs, where it is ε_p placed at `columns`
    for layer in field.layers:
        z = F.linear(h, layer.weight, layer.bias)
        a, slope = _activation_and_slope(z, field.activation)
        if tangent is None:
            dz = w_x.unsqueeze(0) if probes is None else probes @ w_x  # (1 or b, P, width)
            da = slope.unsqueeze(1) * dz
        else:
            dz = (tangent.reshape(-1, tangent.shape[-1]) @ layer.weight.t()).view(*tangent.shape[:2], layer.out_features)
            da = dz.mul_(slope.unsqueeze(1)) if in_place else slope.unsqueeze(1) * dz
        if field.residual and a.shape == h.shape:
            if tangent is None:
                eye = torch.eye(field.dim, dtype=h.dtype, device=h.device).unsqueeze(0)
                tangent = F.pad(eye if probes is None else probes, (columns.start, h.shape[1] - columns.stop))
            h, tangent = h + a, tangent + da
        else:
            h, tangent = a, da
    v = F.linear(h, field.output.weight, field.output.bias)
    if probes is None:  # Σ_i e_iᵀ W_out J e_i
        return v, tangent.flatten(1) @ field.output.weight.flatten()
    back = probes @ field.output.weight  # W_outᵀ ε_p, (b, P, width)
    return v, (tangent * back).flatten(1).sum(-1) / probes.shape[1]


def mlp_divergence(field: VelocityMLP, t: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None = None, *,
                   probes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(v (n, D), div (n,))` of a `VelocityMLP` at (t, x `(n, D)`, context) by forward-mode products, blocks of
    rows; the exact trace for probes None, else Hutchinson's estimate over probes `(n, P, D)`."""
    h = field.inputs(t, x, context)
    n = x.shape[0]
    if probes is not None:
        _check_probes(probes, x)
    tangents = field.dim if probes is None else probes.shape[1]
    width = max(layer.out_features for layer in field.layers)
    rows = max(1, (CPU_BLOCK_ELEMENTS if x.device.type == "cpu" else GPU_BLOCK_ELEMENTS) // (tangents * width))
    w_x = field.layers[0].weight[:, field.x_columns].t().contiguous()  # (D, width), once for every block
    blocks = [_mlp_block(field, h[i:i + rows], None if probes is None else probes[i:i + rows], w_x)
              for i in range(0, max(n, 1), rows)]  # (an empty batch: one empty block)
    if len(blocks) == 1:
        return blocks[0]
    return torch.cat([v for v, _ in blocks]), torch.cat([div for _, div in blocks])


class Divergence(Protocol):
    """How the augmented ODE gets div_x v: `draw(x (n, D))` gives the probes of one solve (None when it needs
    none), then `(velocity, t, x (n, D), *args, probes=...) -> (v (n, D), div (n,))` at each evaluation;
    differentiable when grad mode is on."""

    def draw(self, x: torch.Tensor) -> torch.Tensor | None: ...

    def __call__(self, velocity: Velocity, t: torch.Tensor, x: torch.Tensor, *args,
                 probes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class ExactDivergence:
    """The exact trace: forward-mode for a `VelocityMLP` (`mlp_divergence`; `plain_velocity_mlp`), autograd for
    other fields (`exact_divergence`). Costs about D forward passes per evaluation."""

    def draw(self, x: torch.Tensor) -> None:
        return None

    def __call__(self, velocity, t, x, *args, probes=None):
        if plain_velocity_mlp(velocity):
            return mlp_divergence(velocity, t, x, *args)
        return exact_divergence(velocity, t, x, *args)


@dataclass(frozen=True)
class HutchinsonDivergence:
    """Hutchinson's estimate with `num_probes` vectors per sample, Rademacher (±1) or Gaussian `noise`, drawn once
    per solve (so that adaptive steps see one ODE) from torch's random stream. log q is then unbiased with
    variance falling as 1/num_probes; costs about num_probes forward passes per evaluation, whatever D."""

    num_probes: int = 1
    noise: str = "rademacher"

    def __post_init__(self):
        positive_int(self.num_probes, "num_probes")
        if self.noise not in ("rademacher", "gaussian"):
            raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {self.noise!r}")

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """Probes `(n, num_probes, D)` in x's dtype and device."""
        shape = (x.shape[0], self.num_probes, x.shape[1])
        if self.noise == "gaussian":
            return torch.randn(shape, dtype=x.dtype, device=x.device)
        return torch.randint(0, 2, shape, device=x.device).to(x.dtype).mul_(2).sub_(1)

    def __call__(self, velocity, t, x, *args, probes=None):
        if probes is None:
            raise ValueError("the Hutchinson estimate needs the probes of its solve (draw(x))")
        if plain_velocity_mlp(velocity):
            return mlp_divergence(velocity, t, x, *args, probes=probes)
        return hutchinson_divergence(velocity, t, x, *args, probes=probes)


@dataclass(frozen=True)
class DeterministicDivergence:
    """A plain function `(velocity, t, x (n, D), *args) -> (v, div (n,))` as a `Divergence` that draws no probes."""

    function: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    def draw(self, x: torch.Tensor) -> None:
        return None

    def __call__(self, velocity, t, x, *args, probes=None):
        return self.function(velocity, t, x, *args)


def as_divergence(divergence: "str | Divergence | Callable") -> Divergence:
    """A key of `DIVERGENCES`, a `Divergence`, or a plain function `(velocity, t, x, *args) -> (v, div)` (wrapped in
    `DeterministicDivergence`), as a `Divergence`."""
    if isinstance(divergence, str):
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; known: {sorted(DIVERGENCES)}")
        return DIVERGENCES[divergence]
    if not callable(divergence):
        raise TypeError(f"divergence must be a key of DIVERGENCES, a Divergence or a function, got "
                        f"{type(divergence).__name__}")
    return divergence if callable(getattr(divergence, "draw", None)) else DeterministicDivergence(divergence)


DIVERGENCES: dict[str, Divergence] = {"exact": ExactDivergence(), "hutchinson": HutchinsonDivergence()}
