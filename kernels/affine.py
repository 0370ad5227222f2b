"""Elementwise affine coupling transform in Triton (`fastflow.ops.coupling._affine_transform`'s map): out and
log|det J| from the conditioner's raw outputs, and its backward, for the affine coupling op with autograd on
CUDA (the conditioner runs in torch).

The map, per changed coordinate t of a row: s = bound·tanh(raw[2t] / bound), shift = raw[2t + 1];
forward out = x·exp(s) + shift, inverse out = (x - shift)·exp(-s); log|det J| = ±Σ_t s.
"""

import torch
import triton
import triton.language as tl

from fastflow.kernels import cdiv, next_power_of_2, row_major
from fastflow.kernels.activations import TANH, activate

__all__ = ["affine_backward_triton", "affine_forward_triton"]


@triton.jit
def _load_tile(raw_ptr, x_ptr, rows, cols, mask, n_changed, stride_x, scale_bound):
    """The tile's inputs x (rows `stride_x` apart), shifts, log-scales s and tanh(raw / bound) (zero outside
    `mask`)."""
    raw_offsets = rows[:, None] * (2 * n_changed) + 2 * cols[None, :]
    raw_scale = tl.load(raw_ptr + raw_offsets, mask=mask, other=0.0)
    shift = tl.load(raw_ptr + raw_offsets + 1, mask=mask, other=0.0)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    squashed = activate(raw_scale / scale_bound, TANH, False)
    return x, shift, scale_bound * squashed, squashed


@triton.jit
def _affine_forward_kernel(raw_ptr, x_ptr, out_ptr, ladj_ptr, n_rows, n_changed, stride_x, scale_bound,
                           INVERSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    ladj = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t_0 in range(0, n_changed, BLOCK_T):
        cols = t_0 + tl.arange(0, BLOCK_T)
        mask = row_ok[:, None] & (cols[None, :] < n_changed)
        x, shift, log_scale, _ = _load_tile(raw_ptr, x_ptr, rows, cols, mask, n_changed, stride_x, scale_bound)
        if INVERSE:
            out = (x - shift) * tl.exp(-log_scale)
        else:
            out = x * tl.exp(log_scale) + shift
        ladj += tl.sum(log_scale, axis=1)
        tl.store(out_ptr + rows[:, None] * n_changed + cols[None, :], out, mask=mask)
    if INVERSE:
        ladj = -ladj
    tl.store(ladj_ptr + rows, ladj, mask=row_ok)


@triton.jit
def _affine_backward_kernel(raw_ptr, x_ptr, grad_out_ptr, grad_ladj_ptr, grad_raw_ptr, grad_x_ptr, n_rows, n_changed,
                            stride_x, stride_grad_out, scale_bound, INVERSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """Gradients of Σ grad_out·out + grad_ladj·ladj w.r.t. the raw outputs `(N, 2T)` and x `(N, T)`."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    g_ladj = tl.load(grad_ladj_ptr + rows, mask=row_ok, other=0.0)[:, None]
    for t_0 in range(0, n_changed, BLOCK_T):
        cols = t_0 + tl.arange(0, BLOCK_T)
        mask = row_ok[:, None] & (cols[None, :] < n_changed)
        x, shift, log_scale, squashed = _load_tile(raw_ptr, x_ptr, rows, cols, mask, n_changed, stride_x, scale_bound)
        g_out = tl.load(grad_out_ptr + rows[:, None] * stride_grad_out + cols[None, :], mask=mask, other=0.0)
        if INVERSE:  # out = (x - shift)·exp(-s), ladj = -Σ s
            scale = tl.exp(-log_scale)
            g_x = g_out * scale
            g_shift = -g_x
            g_log_scale = -g_x * (x - shift) - g_ladj
        else:  # out = x·exp(s) + shift, ladj = Σ s
            scale = tl.exp(log_scale)
            g_x = g_out * scale
            g_shift = g_out
            g_log_scale = g_x * x + g_ladj
        g_raw_scale = g_log_scale * (1.0 - squashed * squashed)
        raw_offsets = rows[:, None] * (2 * n_changed) + 2 * cols[None, :]
        tl.store(grad_raw_ptr + raw_offsets, g_raw_scale, mask=mask)
        tl.store(grad_raw_ptr + raw_offsets + 1, g_shift, mask=mask)
        tl.store(grad_x_ptr + rows[:, None] * n_changed + cols[None, :], g_x, mask=mask)


def _launch_meta(n_changed: int) -> dict:
    """BLOCK_T changed coordinates per pass (at most 32) and BLOCK_M rows per program: a tile of 512 elements
    (4 per thread; at 4,096 the sm_90 builds spilled 0.3-1.1 KB per thread, bench/sm90.py)."""
    block_t = min(32, next_power_of_2(n_changed))
    return dict(BLOCK_M=512 // block_t, BLOCK_T=block_t)


def affine_forward_triton(raw, x, *, scale_bound: float, inverse: bool):
    """raw `(N, 2T)` (raw log-scale, shift per coordinate; contiguous), x `(N, T)` (rows any stride apart):
    float32 on one device. Returns out `(N, T)` and log|det J| `(N,)`."""
    x = row_major(x)
    n_rows, n_changed = x.shape
    out, ladj = x.new_empty(n_rows, n_changed), x.new_empty(n_rows)
    meta = _launch_meta(n_changed)
    _affine_forward_kernel[(cdiv(n_rows, meta["BLOCK_M"]),)](raw, x, out, ladj, n_rows, n_changed, x.stride(0),
                                                             float(scale_bound), INVERSE=inverse, **meta)
    return out, ladj


def affine_backward_triton(raw, x, grad_out, grad_ladj, *, scale_bound: float, inverse: bool):
    """Gradients w.r.t. raw `(N, 2T)` and x `(N, T)` for upstream grad_out `(N, T)` and grad_ladj `(N,)`
    (float32 on one device; raw and grad_ladj contiguous, x and grad_out rows any stride apart)."""
    x, grad_out = row_major(x), row_major(grad_out)
    n_rows, n_changed = x.shape
    grad_raw, grad_x = torch.empty_like(raw), x.new_empty(n_rows, n_changed)
    meta = _launch_meta(n_changed)
    _affine_backward_kernel[(cdiv(n_rows, meta["BLOCK_M"]),)](raw, x, grad_out, grad_ladj, grad_raw, grad_x, n_rows,
                                                              n_changed, x.stride(0), grad_out.stride(0),
                                                              float(scale_bound), INVERSE=inverse, **meta)
    return grad_raw, grad_x
