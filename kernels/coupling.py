"""Fused affine coupling layer in Triton: per block of rows, the conditioner MLP (two hidden layers,
SiLU) on [kept, context], the affine transform of the changed half and its log-determinant, with the
hidden activations kept on chip. Forward/inverse map; gradients come from `fastflow.ops.coupling`.
"""

import torch
import triton
import triton.language as tl

__all__ = ["affine_coupling_triton"]


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _affine_coupling_kernel(
    # pointers
    kept_ptr, context_ptr, changed_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, w_scale_ptr, b_scale_ptr, w_shift_ptr, b_shift_ptr,
    out_ptr, ladj_ptr,
    # dimensions
    n_rows, n_kept, n_context, n_hidden, n_changed,
    # scalars
    scale_bound,
    # meta-parameters
    INVERSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_OUT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    cols_in = tl.arange(0, BLOCK_IN)
    cols_h = tl.arange(0, BLOCK_H)
    cols_out = tl.arange(0, BLOCK_OUT)
    n_in = n_kept + n_context

    # conditioner input [kept, context]: (BLOCK_M, BLOCK_IN), zero-padded
    kept_mask = row_ok[:, None] & (cols_in[None, :] < n_kept)
    x_in = tl.load(kept_ptr + rows[:, None] * n_kept + cols_in[None, :], mask=kept_mask, other=0.0)
    context_cols = cols_in - n_kept
    context_mask = row_ok[:, None] & (cols_in[None, :] >= n_kept) & (cols_in[None, :] < n_in)
    x_in += tl.load(context_ptr + rows[:, None] * n_context + context_cols[None, :], mask=context_mask, other=0.0)

    # hidden layers: weights are (out, in) row-major, loaded transposed as (in, out) tiles
    w1 = tl.load(w1_ptr + cols_h[None, :] * n_in + cols_in[:, None],
                 mask=(cols_in[:, None] < n_in) & (cols_h[None, :] < n_hidden), other=0.0)
    b1 = tl.load(b1_ptr + cols_h, mask=cols_h < n_hidden, other=0.0)
    h = _silu(tl.dot(x_in, w1) + b1[None, :])
    w2 = tl.load(w2_ptr + cols_h[None, :] * n_hidden + cols_h[:, None],
                 mask=(cols_h[:, None] < n_hidden) & (cols_h[None, :] < n_hidden), other=0.0)
    b2 = tl.load(b2_ptr + cols_h, mask=cols_h < n_hidden, other=0.0)
    h = _silu(tl.dot(h, w2) + b2[None, :])

    # transform parameters for the changed coordinates: raw log-scales and shifts, (BLOCK_M, BLOCK_OUT)
    out_mask = (cols_h[:, None] < n_hidden) & (cols_out[None, :] < n_changed)
    w_scale = tl.load(w_scale_ptr + cols_out[None, :] * n_hidden + cols_h[:, None], mask=out_mask, other=0.0)
    w_shift = tl.load(w_shift_ptr + cols_out[None, :] * n_hidden + cols_h[:, None], mask=out_mask, other=0.0)
    b_scale = tl.load(b_scale_ptr + cols_out, mask=cols_out < n_changed, other=0.0)
    b_shift = tl.load(b_shift_ptr + cols_out, mask=cols_out < n_changed, other=0.0)
    raw_scale = tl.dot(h, w_scale) + b_scale[None, :]
    shift = tl.dot(h, w_shift) + b_shift[None, :]
    log_scale = scale_bound * (2.0 * tl.sigmoid(2.0 * raw_scale / scale_bound) - 1.0)  # bound·tanh(raw/bound)

    changed_mask = row_ok[:, None] & (cols_out[None, :] < n_changed)
    offsets = rows[:, None] * n_changed + cols_out[None, :]
    changed = tl.load(changed_ptr + offsets, mask=changed_mask, other=0.0)
    if INVERSE:
        out = (changed - shift) * tl.exp(-log_scale)
        ladj = -tl.sum(tl.where(changed_mask, log_scale, 0.0), axis=1)
    else:
        out = changed * tl.exp(log_scale) + shift
        ladj = tl.sum(tl.where(changed_mask, log_scale, 0.0), axis=1)
    tl.store(out_ptr + offsets, out, mask=changed_mask)
    tl.store(ladj_ptr + rows, ladj, mask=row_ok)


def _block(n: int) -> int:
    """Power-of-2 tile width >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def affine_coupling_triton(kept, context, changed, weights, *, scale_bound: float, inverse: bool, block_m: int = 64):
    """Launch the fused kernel.

    Arguments:
        kept `(N, K)`, context `(N, C)` or None, changed `(N, T)`: float32 on one device.
        weights: (w1 `(H, K+C)`, b1, w2 `(H, H)`, b2, w3 `(2T, H)`, b3 `(2T,)`) with w3's rows interleaved
            as (raw log-scale, shift) per changed coordinate.
    Returns:
        out `(N, T)` and log|det J| `(N,)`.
    """
    w1, b1, w2, b2, w3, b3 = (w.contiguous() for w in weights)
    kept, changed = kept.contiguous(), changed.contiguous()
    n_rows, n_changed = changed.shape
    n_context = 0 if context is None else context.shape[1]
    context = kept.new_empty(0) if context is None else context.contiguous()
    w_scale, w_shift = w3[0::2].contiguous(), w3[1::2].contiguous()
    b_scale, b_shift = b3[0::2].contiguous(), b3[1::2].contiguous()
    out = torch.empty_like(changed)
    ladj = changed.new_empty(n_rows)
    grid = (triton.cdiv(n_rows, block_m),)
    _affine_coupling_kernel[grid](
        kept, context, changed, w1, b1, w2, b2, w_scale, b_scale, w_shift, b_shift, out, ladj,
        n_rows, kept.shape[1], n_context, w1.shape[0], n_changed,
        float(scale_bound),
        INVERSE=inverse, BLOCK_M=block_m, BLOCK_IN=_block(kept.shape[1] + n_context), BLOCK_H=_block(w1.shape[0]),
        BLOCK_OUT=_block(n_changed),
    )
    return out, ladj
