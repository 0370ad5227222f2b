"""Elementwise affine coupling transform in Triton (`fastflow.ops.coupling._affine_transform`'s map): out and
log|det J| from the conditioner's raw outputs, and its backward, for the affine coupling op with autograd on
CUDA (the conditioner runs in torch); the training step of a layer in a flow (`affine_step_*`: the last SiLU,
the conditioner's last layer, the map, the running log-determinant and the permuted merge, each way); and the
jit helpers the fused coupling kernels share (the map, its gradients, the last layer, column stores).

The map, per changed coordinate t of a row: s = bound·tanh(raw[2t] / bound), shift = raw[2t + 1];
forward out = x·exp(s) + shift, inverse out = (x - shift)·exp(-s); log|det J| = ±Σ_t s.
"""

import functools

import torch
import triton
import triton.language as tl

from fastflow.kernels import cdiv, dot_tile, next_power_of_2, row_major
from fastflow.kernels.activations import SILU, TANH, activate, silu_derivative

__all__ = ["affine_backward_triton", "affine_forward_triton", "affine_step_backward_triton", "affine_step_forward_triton"]


@triton.jit
def store_columns(dst_ptr, stride_dst, column_map_ptr, rows, row_ok, cols, n_cols, values, SCATTER: tl.constexpr):
    """Store values `(BLOCK_M, len(cols))` (columns `cols < n_cols`) into dst's rows (`stride_dst` elements
    apart) at columns `cols`, or at `column_map[cols]` when SCATTER (a permutation fused into the store)."""
    ok = row_ok[:, None] & (cols[None, :] < n_cols)
    if SCATTER:
        cols = tl.load(column_map_ptr + cols, mask=cols < n_cols, other=0)
    tl.store(dst_ptr + rows[:, None] * stride_dst + cols[None, :], values, mask=ok)


@triton.jit
def copy_columns(src_ptr, stride_src, dst_ptr, stride_dst, column_map_ptr, rows, row_ok, n_cols, BLOCK_C: tl.constexpr):
    """Columns [0, n_cols) of src's rows to dst's columns `column_map[c]` (`store_columns`)."""
    cols = tl.arange(0, BLOCK_C)
    values = tl.load(src_ptr + rows[:, None] * stride_src + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < n_cols),
                     other=0.0)
    store_columns(dst_ptr, stride_dst, column_map_ptr, rows, row_ok, cols, n_cols, values, True)


@triton.jit
def gather_columns(src_ptr, stride_src, column_map_ptr, rows, row_ok, cols, n_cols):
    """src's values at columns `column_map[cols]` of its rows, `(BLOCK_M, len(cols))`, zero past n_cols."""
    source = tl.load(column_map_ptr + cols, mask=cols < n_cols, other=0)
    return tl.load(src_ptr + rows[:, None] * stride_src + source[None, :], mask=row_ok[:, None] & (cols[None, :] < n_cols),
                   other=0.0)


@triton.jit
def affine_map(x, shift, log_scale, mask, INVERSE: tl.constexpr):
    """The map of a tile and its log|det J| per row (the tile's entries outside `mask` left out)."""
    ladj = tl.sum(tl.where(mask, log_scale, 0.0), axis=1)
    if INVERSE:
        out = (x - shift) * tl.exp(-log_scale)
        ladj = -ladj
    else:
        out = x * tl.exp(log_scale) + shift
    return out, ladj


@triton.jit
def affine_gradients(x, shift, log_scale, squashed, g_out, g_ladj, INVERSE: tl.constexpr):
    """Gradients of Σ g_out·out + g_ladj·ladj w.r.t. x, the shift and the raw log-scale (s = bound·squashed,
    squashed = tanh(raw / bound)), per entry of a tile."""
    if INVERSE:  # out = (x - shift)·exp(-s), ladj = -Σ s
        g_x = g_out * tl.exp(-log_scale)
        g_shift = -g_x
        g_log_scale = -g_x * (x - shift) - g_ladj
    else:  # out = x·exp(s) + shift, ladj = Σ s
        g_x = g_out * tl.exp(log_scale)
        g_shift = g_out
        g_log_scale = g_x * x + g_ladj
    return g_x, g_shift, g_log_scale * (1.0 - squashed * squashed)


@triton.jit
def affine_parameters(h, w3_ptr, b3_ptr, n_hidden, n_changed, BLOCK_H: tl.constexpr, BLOCK_OUT: tl.constexpr,
                      PRECISION: tl.constexpr):
    """The conditioner's last layer on hidden activations h `(BLOCK_M, BLOCK_H)`: raw log-scales and shifts
    `(BLOCK_M, BLOCK_OUT)` from w3's rows 2t and 2t + 1 (coordinate t), and those rows as (in, out) tiles."""
    cols_h = tl.arange(0, BLOCK_H)
    cols_out = tl.arange(0, BLOCK_OUT)
    out_ok = cols_out < n_changed
    w_mask = (cols_h[:, None] < n_hidden) & out_ok[None, :]
    w_scale = tl.load(w3_ptr + (2 * cols_out)[None, :] * n_hidden + cols_h[:, None], mask=w_mask, other=0.0)
    w_shift = tl.load(w3_ptr + (2 * cols_out + 1)[None, :] * n_hidden + cols_h[:, None], mask=w_mask, other=0.0)
    b_scale = tl.load(b3_ptr + 2 * cols_out, mask=out_ok, other=0.0)
    b_shift = tl.load(b3_ptr + 2 * cols_out + 1, mask=out_ok, other=0.0)
    raw_scale = tl.dot(h, w_scale, input_precision=PRECISION) + b_scale[None, :]
    shift = tl.dot(h, w_shift, input_precision=PRECISION) + b_shift[None, :]
    return raw_scale, shift, w_scale, w_shift


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
        out, chunk_ladj = affine_map(x, shift, log_scale, mask, INVERSE)
        ladj += chunk_ladj
        tl.store(out_ptr + rows[:, None] * n_changed + cols[None, :], out, mask=mask)
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
        g_x, g_shift, g_raw_scale = affine_gradients(x, shift, log_scale, squashed, g_out, g_ladj, INVERSE)
        raw_offsets = rows[:, None] * (2 * n_changed) + 2 * cols[None, :]
        tl.store(grad_raw_ptr + raw_offsets, g_raw_scale, mask=mask)
        tl.store(grad_raw_ptr + raw_offsets + 1, g_shift, mask=mask)
        tl.store(grad_x_ptr + rows[:, None] * n_changed + cols[None, :], g_x, mask=mask)


@triton.jit
def _affine_step_forward_kernel(a_ptr, w3_ptr, b3_ptr, kept_ptr, changed_ptr, column_map_ptr, ladj_in_ptr, y_ptr, ladj_ptr,
                                n_rows, n_dim, n_hidden, kept_0, n_kept, changed_0, n_changed, stride_kept,
                                stride_changed, scale_bound, INVERSE: tl.constexpr, HAS_LADJ_IN: tl.constexpr,
                                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                                BLOCK_OUT: tl.constexpr, BLOCK_C: tl.constexpr):
    """One affine coupling layer from its conditioner's last hidden pre-activations a `(N, H)`: h = SiLU(a), the
    last layer, the map, the kept coordinates copied, both stored through the column map into y `(N, D)`;
    ladj = ladj_in + log|det J|."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    cols_h = tl.arange(0, BLOCK_H)
    a = tl.load(a_ptr + rows[:, None] * n_hidden + cols_h[None, :], mask=row_ok[:, None] & (cols_h[None, :] < n_hidden),
                other=0.0)
    h = activate(a, SILU, False)
    raw_scale, shift, _, _ = affine_parameters(h, w3_ptr, b3_ptr, n_hidden, n_changed, BLOCK_H, BLOCK_OUT, PRECISION)
    cols = tl.arange(0, BLOCK_OUT)
    mask = row_ok[:, None] & (cols[None, :] < n_changed)
    x = tl.load(changed_ptr + rows[:, None] * stride_changed + cols[None, :], mask=mask, other=0.0)
    out, ladj = affine_map(x, shift, scale_bound * activate(raw_scale / scale_bound, TANH, False), mask, INVERSE)
    store_columns(y_ptr, n_dim, column_map_ptr + changed_0, rows, row_ok, cols, n_changed, out, True)
    copy_columns(kept_ptr, stride_kept, y_ptr, n_dim, column_map_ptr + kept_0, rows, row_ok, n_kept, BLOCK_C)
    if HAS_LADJ_IN:
        ladj += tl.load(ladj_in_ptr + rows, mask=row_ok, other=0.0)
    tl.store(ladj_ptr + rows, ladj, mask=row_ok)


@triton.jit
def _affine_step_backward_kernel(a_ptr, w3_ptr, b3_ptr, changed_ptr, column_map_ptr, grad_y_ptr, grad_ladj_ptr,
                                 h_ptr, grad_a_ptr, grad_raw_ptr, grad_kept_ptr, grad_changed_ptr,
                                 n_rows, n_dim, n_hidden, kept_0, n_kept, changed_0, n_changed, stride_changed,
                                 stride_grad_y, scale_bound, INVERSE: tl.constexpr, PRECISION: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_OUT: tl.constexpr,
                                 BLOCK_C: tl.constexpr):
    """Gradients of Σ grad_y·y + grad_ladj·ladj of `_affine_step_forward_kernel` w.r.t. a `(N, H)`, the last
    layer's raw outputs `(N, 2T)`, kept `(N, K)` and changed `(N, T)`; and h = SiLU(a) `(N, H)` (with the raw
    outputs' gradients, the last layer's weight gradient)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    cols_h = tl.arange(0, BLOCK_H)
    h_mask = row_ok[:, None] & (cols_h[None, :] < n_hidden)
    a = tl.load(a_ptr + rows[:, None] * n_hidden + cols_h[None, :], mask=h_mask, other=0.0)
    h = activate(a, SILU, False)
    tl.store(h_ptr + rows[:, None] * n_hidden + cols_h[None, :], h, mask=h_mask)
    raw_scale, shift, w_scale, w_shift = affine_parameters(h, w3_ptr, b3_ptr, n_hidden, n_changed, BLOCK_H, BLOCK_OUT,
                                                           PRECISION)
    cols = tl.arange(0, BLOCK_OUT)
    mask = row_ok[:, None] & (cols[None, :] < n_changed)
    x = tl.load(changed_ptr + rows[:, None] * stride_changed + cols[None, :], mask=mask, other=0.0)
    squashed = activate(raw_scale / scale_bound, TANH, False)
    g_out = gather_columns(grad_y_ptr, stride_grad_y, column_map_ptr + changed_0, rows, row_ok, cols, n_changed)
    g_ladj = tl.load(grad_ladj_ptr + rows, mask=row_ok, other=0.0)[:, None]
    g_x, g_shift, g_raw_scale = affine_gradients(x, shift, scale_bound * squashed, squashed, g_out, g_ladj, INVERSE)
    g_raw_scale = tl.where(mask, g_raw_scale, 0.0)
    raw_offsets = rows[:, None] * (2 * n_changed) + 2 * cols[None, :]
    tl.store(grad_raw_ptr + raw_offsets, g_raw_scale, mask=mask)
    tl.store(grad_raw_ptr + raw_offsets + 1, g_shift, mask=mask)
    tl.store(grad_changed_ptr + rows[:, None] * n_changed + cols[None, :], g_x, mask=mask)
    grad_h = (tl.dot(g_raw_scale, tl.trans(w_scale), input_precision=PRECISION)
              + tl.dot(g_shift, tl.trans(w_shift), input_precision=PRECISION))
    grad_a = grad_h * silu_derivative(a)  # (the sigmoid recomputed here: fewer tiles live across the products)
    tl.store(grad_a_ptr + rows[:, None] * n_hidden + cols_h[None, :], grad_a, mask=h_mask)
    cols_c = tl.arange(0, BLOCK_C)
    g_kept = gather_columns(grad_y_ptr, stride_grad_y, column_map_ptr + kept_0, rows, row_ok, cols_c, n_kept)
    tl.store(grad_kept_ptr + rows[:, None] * n_kept + cols_c[None, :], g_kept, mask=row_ok[:, None] & (cols_c[None, :] < n_kept))


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


@functools.lru_cache(maxsize=256)
def _step_meta(n_hidden: int, n_kept: int, n_changed: int, precision: str, block_m: int | None = None,
               num_warps: int | None = None) -> dict:
    """Tiles and warps of the step kernels (`block_m`, `num_warps` override them, for tuning; cached: not to be
    changed), from sm_90 compiles (bench/sm90.py `compile_affine_step`, Triton 3.6; not yet timed): 16 rows per
    program with the whole hidden width, 8 warps. The backward kept no spills at width 128 (1,912 SASS
    instructions; 32 rows at 4 warps spilled 424 B in 4,872) and 200 B at width 256."""
    return dict(PRECISION=precision, BLOCK_M=block_m or 16, BLOCK_H=dot_tile(n_hidden), BLOCK_OUT=dot_tile(n_changed),
                BLOCK_C=next_power_of_2(max(n_kept, 1)), num_warps=num_warps or 8)


def affine_step_forward_triton(a, w3, b3, kept, changed, ladj_in, column_map, *, kept_0: int, changed_0: int,
                               scale_bound: float, inverse: bool, precision: str, block_m: int | None = None,
                               num_warps: int | None = None):
    """One affine coupling layer from its conditioner's last hidden pre-activations, with the permutation after it.

    Arguments:
        a `(N, H)`: the conditioner's last hidden pre-activations, h = SiLU(a) (contiguous). w3 `(2T, H)`,
            b3 `(2T,)`: its last layer, rows interleaved (raw log-scale, shift) per changed coordinate.
        kept `(N, K)`, changed `(N, T)`: the layer's input columns [kept_0, kept_0 + K) and
            [changed_0, changed_0 + T) (rows any stride apart). ladj_in `(N,)` or None: the log-determinant so far.
        column_map `(D,)` int32: where the output stores input column c (D = K + T).
        precision: tl.dot input precision of the last layer's products.
        block_m, num_warps: rows and warps per program (launch tuning; None: `_step_meta`'s).
    Returns:
        y `(N, D)` (the layer's output, permuted) and ladj_in + log|det J| `(N,)`.
    """
    kept, changed = row_major(kept), row_major(changed)
    n_rows, n_kept = kept.shape
    n_changed = changed.shape[1]
    y, ladj = a.new_empty(n_rows, n_kept + n_changed), a.new_empty(n_rows)
    meta = _step_meta(a.shape[1], n_kept, n_changed, precision, block_m, num_warps)
    _affine_step_forward_kernel[(cdiv(n_rows, meta["BLOCK_M"]),)](
        a, w3, b3, kept, changed, column_map, ladj if ladj_in is None else ladj_in, y, ladj,
        n_rows, n_kept + n_changed, a.shape[1], kept_0, n_kept, changed_0, n_changed, kept.stride(0), changed.stride(0),
        float(scale_bound), INVERSE=inverse, HAS_LADJ_IN=ladj_in is not None, **meta)
    return y, ladj


def affine_step_backward_triton(a, w3, b3, changed, column_map, grad_y, grad_ladj, *, kept_0: int, n_kept: int,
                                changed_0: int, scale_bound: float, inverse: bool, precision: str,
                                block_m: int | None = None, num_warps: int | None = None):
    """Gradients of `affine_step_forward_triton` for upstream grad_y `(N, D)` (rows any stride apart) and
    grad_ladj `(N,)` (contiguous): w.r.t. a `(N, H)`, the last layer's raw outputs `(N, 2T)`, kept `(N, K)` and
    changed `(N, T)`; and h = SiLU(a) `(N, H)`. block_m, num_warps: as the forward's."""
    changed, grad_y = row_major(changed), row_major(grad_y)
    n_rows, n_changed = changed.shape
    h, grad_a, grad_raw = torch.empty_like(a), torch.empty_like(a), a.new_empty(n_rows, 2 * n_changed)
    grad_kept, grad_changed = a.new_empty(n_rows, n_kept), a.new_empty(n_rows, n_changed)
    meta = _step_meta(a.shape[1], n_kept, n_changed, precision, block_m, num_warps)
    _affine_step_backward_kernel[(cdiv(n_rows, meta["BLOCK_M"]),)](
        a, w3, b3, changed, column_map, grad_y, grad_ladj, h, grad_a, grad_raw, grad_kept, grad_changed,
        n_rows, n_kept + n_changed, a.shape[1], kept_0, n_kept, changed_0, n_changed, changed.stride(0), grad_y.stride(0),
        float(scale_bound), INVERSE=inverse, **meta)
    return grad_a, grad_raw, grad_kept, grad_changed, h
