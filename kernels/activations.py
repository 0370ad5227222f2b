"""Activations shared by the fused kernels, exact or through the GPU's approximate tanh.

`APPROXIMATE` kernels (compiled for NVIDIA GPUs with TF32 products) evaluate SiLU as z/2 · (1 + tanh(z/2))
and tanh with one `tanh.approx.f32` instruction (relative error ~2^-11, TF32's own rounding): one special
function unit operation per element instead of an exponential and a reciprocal with their range checks.
Triton's interpreter has no inline PTX, so it always runs the exact forms.
"""

import torch
import triton
import triton.language as tl

__all__ = ["ACTIVATION_IDS", "SILU", "TANH", "activate", "approximate_activations", "silu_derivative"]

ACTIVATION_IDS = {"silu": 0, "tanh": 1, "gelu": 2, "relu": 3}
SILU, TANH = tl.constexpr(ACTIVATION_IDS["silu"]), tl.constexpr(ACTIVATION_IDS["tanh"])  # for use inside kernels


def approximate_activations(precision: str, device: torch.device, requested: bool | None = None) -> bool:
    """Whether a kernel with these products on `device` takes the approximate activations: as `requested`, or
    by default for TF32 products on an NVIDIA GPU (whose 10-bit mantissas already bound the accuracy)."""
    nvidia = device.type == "cuda" and torch.version.hip is None
    if requested and not nvidia:
        raise ValueError(f"approximate activations run on NVIDIA GPUs only (inline PTX), not on {device}")
    return precision == "tf32" and nvidia if requested is None else bool(requested)


@triton.jit
def _tanh_approx(x):
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def activate(z, ACTIVATION: tl.constexpr, APPROXIMATE: tl.constexpr):
    """act(z) elementwise; ACTIVATION is an `ACTIVATION_IDS` value."""
    if ACTIVATION == 0:
        if APPROXIMATE:
            half = 0.5 * z
            out = half + half * _tanh_approx(half)
        else:
            out = z * tl.sigmoid(z)
    elif ACTIVATION == 1:
        if APPROXIMATE:
            out = _tanh_approx(z)
        else:
            out = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    elif ACTIVATION == 2:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # exact GELU, as nn.GELU()
    else:
        out = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN (a GPU's max drops it)
    return out


@triton.jit
def silu_derivative(z):
    """SiLU'(z) elementwise (exact): σ(z)·(1 + z·(1 - σ(z)))."""
    sigmoid = 1.0 / (1.0 + tl.exp(-z))
    return sigmoid * (1.0 + z * (1.0 - sigmoid))
