"""Rational-quadratic spline (`fastflow.ops.spline.rq_spline_ref`'s parametrization) in Triton: the shared
per-element math on tiles whose last axis holds the K bins (used by the fused coupling kernel too), an
elementwise forward/inverse kernel with log|det J| and its backward, for a spline op with autograd on CUDA, and
a spline coupling layer's step in a flow without autograd (`spline_step_forward_triton`: the splines of the
changed coordinates from the conditioner's outputs, the running log-determinant and the permuted merge).
"""

import torch
import triton
import triton.language as tl

from fastflow.kernels import cdiv, next_power_of_2, row_major
from fastflow.kernels.affine import copy_columns

__all__ = ["rq_spline_backward_triton", "rq_spline_forward_triton", "spline_step_forward_triton"]


@triton.jit
def _softplus(x):
    return tl.where(x < 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)  # NaN stays NaN


@triton.jit
def _spline_knots(raw, bins, bin_ok, bound, min_size, num_bins):
    """Softmax over the last (bin) axis of `raw (..., K)`: returns the softmax fractions, the bin sizes and
    the left knots on [-bound, bound]. As the reference: knots from the cumulative sizes with the last pinned
    at +bound, sizes their differences (so the top bin ends exactly at the bound)."""
    raw = tl.where(bin_ok, raw, float("-inf"))
    raw = raw - tl.expand_dims(tl.max(raw, axis=-1), -1)
    weights = tl.where(bin_ok, tl.exp(raw), 0.0)
    fraction = weights / tl.expand_dims(tl.sum(weights, axis=-1), -1)
    sizes = tl.where(bin_ok, min_size + (1.0 - min_size * num_bins) * fraction, 0.0)
    cumulative = tl.cumsum(sizes, axis=-1)
    right = tl.where(bins == num_bins - 1, bound, 2.0 * bound * cumulative - bound)
    left = 2.0 * bound * (cumulative - sizes) - bound
    return fraction, right - left, left


@triton.jit
def _pick(onehot, table):
    """table `(..., K)` at each element's bin."""
    return tl.sum(tl.where(onehot, table, 0.0), axis=-1)


@triton.jit
def _rq_locate(value, widths, left_x, heights, left_y, raw_dleft, raw_dright, bins, bin_ok, num_bins, bound,
               min_derivative, derivative_shift, INVERSE: tl.constexpr):
    """Each element's bin and local spline for `value (...)` and bin tiles `(..., K)` (raw_dleft / raw_dright:
    the raw interior derivative at each bin's left / right knot). Returns (inside, bin_index, onehot, x_k, w_k,
    y_k, h_k, d_k, d_k1, shifted raw derivative at the bin's left and right knots, t): t is the
    position in the bin of x (forward) or of the root of the rational-quadratic equation in y (inverse)."""
    below, above = value < -bound, value > bound
    inside = ~(below | above)  # NaN too, so that it reaches the outputs and the log-det (a GPU's min/max drop it)
    clamped = tl.where(below, -bound, tl.where(above, bound, value))
    search = left_y if INVERSE else left_x
    bin_index = tl.sum(tl.where(bin_ok & (bins > 0) & (search < tl.expand_dims(clamped, -1)), 1, 0), axis=-1)
    onehot = bins == tl.expand_dims(bin_index, -1)
    x_k, w_k = _pick(onehot, left_x), _pick(onehot, widths)
    y_k, h_k = _pick(onehot, left_y), _pick(onehot, heights)
    raw_k = _pick(onehot, raw_dleft) + derivative_shift
    raw_k1 = _pick(onehot, raw_dright) + derivative_shift
    d_k = tl.where(bin_index == 0, 1.0, min_derivative + _softplus(raw_k))  # tails: derivative 1 at ±bound
    d_k1 = tl.where(bin_index == num_bins - 1, 1.0, min_derivative + _softplus(raw_k1))
    slope = h_k / w_k
    curvature = d_k1 + d_k - 2.0 * slope
    if INVERSE:  # the quadratic's root in [0, 1] (stable form)
        dy = clamped - y_k
        a = h_k * (slope - d_k) + dy * curvature
        b = h_k * d_k - dy * curvature
        c = -slope * dy
        t = (2.0 * c) / (-b - tl.sqrt(tl.maximum(b * b - 4.0 * a * c, 0.0)))
    else:
        t = (clamped - x_k) / w_k
    return inside, bin_index, onehot, x_k, w_k, y_k, h_k, d_k, d_k1, raw_k, raw_k1, t


@triton.jit
def _rq_value(t, x_k, w_k, y_k, h_k, d_k, d_k1, INVERSE: tl.constexpr):
    """The spline's value and log|det J| at position t of the bin (inside the interval)."""
    slope = h_k / w_k
    u = t * (1.0 - t)
    denominator = slope + (d_k1 + d_k - 2.0 * slope) * u
    numerator = slope * slope * (d_k1 * t * t + 2.0 * slope * u + d_k * (1.0 - t) * (1.0 - t))
    logabsdet = tl.log(numerator) - 2.0 * tl.log(denominator)
    if INVERSE:
        result = x_k + t * w_k
        logabsdet = -logabsdet
    else:
        result = y_k + h_k * (slope * t * t + d_k * u) / denominator
    return result, logabsdet


@triton.jit
def _load_spline(x_ptr, p_ptr, rows, row_ok, x_offsets, num_bins, bound, min_width, min_height, min_derivative,
                 derivative_shift, INVERSE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Loads the elements `rows` of x (at `x_offsets`) and their raw parameters `(n, 3K-1)`, builds their splines
    and locates them: `_rq_locate`'s results, then bins, the width and height fractions, and the elements."""
    n_params = 3 * num_bins - 1
    bins = tl.arange(0, BLOCK_K)[None, :]
    bin_ok = bins < num_bins
    value = tl.load(x_ptr + x_offsets, mask=row_ok, other=0.0)
    base = p_ptr + rows[:, None] * n_params
    mask = row_ok[:, None] & bin_ok
    raw_width = tl.load(base + bins, mask=mask, other=0.0)
    raw_height = tl.load(base + num_bins + bins, mask=mask, other=0.0)
    raw_dleft = tl.load(base + 2 * num_bins + bins - 1, mask=mask & (bins >= 1), other=0.0)  # knot k: derivative k-1
    raw_dright = tl.load(base + 2 * num_bins + bins, mask=mask & (bins <= num_bins - 2), other=0.0)
    width_fraction, widths, left_x = _spline_knots(raw_width, bins, bin_ok, bound, min_width, num_bins)
    height_fraction, heights, left_y = _spline_knots(raw_height, bins, bin_ok, bound, min_height, num_bins)
    inside, bin_index, onehot, x_k, w_k, y_k, h_k, d_k, d_k1, raw_k, raw_k1, t = _rq_locate(
        value, widths, left_x, heights, left_y, raw_dleft, raw_dright, bins, bin_ok, num_bins, bound, min_derivative,
        derivative_shift, INVERSE)
    return (inside, bin_index, onehot, x_k, w_k, y_k, h_k, d_k, d_k1, raw_k, raw_k1, t, bins, width_fraction,
            height_fraction, value)


@triton.jit
def _offsets(elements, count, stride_row, stride_column):
    """Where the flat elements (row-major over rows of `count`) sit in a tensor with these strides."""
    return (elements // count) * stride_row + (elements % count) * stride_column


@triton.jit
def _rq_forward_kernel(x_ptr, p_ptr, out_ptr, ladj_ptr, n, num_bins, count, stride_x,
                       bound, min_width, min_height, min_derivative, derivative_shift,
                       INVERSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    inside, bin_index, onehot, x_k, w_k, y_k, h_k, d_k, d_k1, raw_k, raw_k1, t, bins, width_fraction, height_fraction, \
        value = _load_spline(x_ptr, p_ptr, rows, row_ok, _offsets(rows, count, stride_x, 1), num_bins, bound, min_width,
                             min_height, min_derivative, derivative_shift, INVERSE, BLOCK_K)
    result, logabsdet = _rq_value(t, x_k, w_k, y_k, h_k, d_k, d_k1, INVERSE)
    tl.store(out_ptr + rows, tl.where(inside, result, value), mask=row_ok)  # outside: passed through
    tl.store(ladj_ptr + rows, tl.where(inside, logabsdet, 0.0), mask=row_ok)


@triton.jit
def rq_gradients(g_y, g_l, inside, bin_index, onehot, w_k, h_k, d_k, d_k1, raw_k, raw_k1, t, bins, width_fraction,
                 height_fraction, num_bins, bound, min_width, min_height, INVERSE: tl.constexpr):
    """Gradients of Σ g_y·out + g_l·ladj w.r.t. the elements `(...)` and their raw parameters, from `_rq_locate`'s
    results (as csrc's backward_block; for the inverse, implicit differentiation through the forward map): grad_x
    `(...)` (g_y outside the interval, where the spline is the identity), and `(..., K)` tiles of the raw widths',
    heights' and interior derivatives' gradients (derivative slot j along the last axis; zero outside)."""
    grad_out = g_y
    s = h_k / w_k
    u = t * (1.0 - t)
    c = d_k1 + d_k - 2.0 * s
    den = s + c * u
    A = s * t * t + d_k * u
    G = d_k1 * t * t + 2.0 * s * u + d_k * (1.0 - t) * (1.0 - t)
    one_m_2t = 1.0 - 2.0 * t
    den2 = den * den
    den_t = c * one_m_2t
    den_s = 1.0 - 2.0 * u
    G_t = 2.0 * d_k1 * t + 2.0 * s * one_m_2t - 2.0 * d_k * (1.0 - t)
    ladj_dt = G_t / G - 2.0 * den_t / den
    if INVERSE:
        upstream = (g_y - g_l * ladj_dt / w_k) / (s * s * G / den2)
        grad_x = upstream
        g_y = -upstream
        g_l = -g_l
    else:
        grad_x = g_y * s * s * G / den2 + g_l * ladj_dt / w_k
    A_t = 2.0 * s * t + d_k * one_m_2t
    if INVERSE:  # x = X + W t with t free of X: exactly -grad_out W (the general form cancels two huge terms)
        g_t = -grad_out * w_k
    else:
        g_t = g_y * h_k * (A_t * den - A * den_t) / den2 + g_l * ladj_dt
    g_s = g_y * h_k * (t * t * den - A * den_s) / den2 + g_l * (2.0 / s + 2.0 * u / G - 2.0 * den_s / den)
    g_d0 = g_y * h_k * u * (den - A) / den2 + g_l * ((1.0 - t) * (1.0 - t) / G - 2.0 * u / den)
    g_d1 = -g_y * h_k * A * u / den2 + g_l * (t * t / G - 2.0 * u / den)
    g_height_at = g_y * A / den + g_s / w_k
    g_width_below = -g_t / w_k
    g_width_at = -g_t * t / w_k - g_s * s / w_k

    # knots X_k = -B + 2B Σ_{i<k} size_i, width_k = 2B size_k (heights alike), size = min + scale·softmax(raw):
    # g_size_i = 2B (g_below [i < bin] + g_at [i = bin]), then softmax's backward
    below = bins < tl.expand_dims(bin_index, -1)
    keep = tl.expand_dims(inside, -1)
    g_sizes = 2.0 * bound * tl.where(below, tl.expand_dims(g_width_below, -1), tl.where(onehot, tl.expand_dims(g_width_at, -1), 0.0))
    g_width = (1.0 - min_width * num_bins) * width_fraction * (g_sizes - tl.expand_dims(tl.sum(width_fraction * g_sizes, axis=-1), -1))
    g_sizes = 2.0 * bound * tl.where(below, tl.expand_dims(g_y, -1), tl.where(onehot, tl.expand_dims(g_height_at, -1), 0.0))
    g_height = (1.0 - min_height * num_bins) * height_fraction * (g_sizes - tl.expand_dims(tl.sum(height_fraction * g_sizes, axis=-1), -1))
    # interior derivative j (slot j, knot j + 1) = min + softplus(raw_j + shift): the bin's left knot is slot
    # bin - 1, its right knot slot bin (tails have no slot)
    g_left = tl.expand_dims(g_d0 * tl.sigmoid(raw_k), -1)
    g_right = tl.expand_dims(g_d1 * tl.sigmoid(raw_k1), -1)
    slot_bin = tl.expand_dims(bin_index, -1)
    g_derivative = tl.where(bins == slot_bin - 1, g_left, tl.where(bins == slot_bin, g_right, 0.0))
    return (tl.where(inside, grad_x, grad_out), tl.where(keep, g_width, 0.0), tl.where(keep, g_height, 0.0),
            tl.where(keep, g_derivative, 0.0))


@triton.jit
def _rq_backward_kernel(x_ptr, p_ptr, grad_out_ptr, grad_ladj_ptr, grad_x_ptr, grad_p_ptr, n, num_bins, count, stride_x,
                        stride_grad_out, stride_ladj_row, stride_ladj_column,
                        bound, min_width, min_height, min_derivative, derivative_shift,
                        INVERSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Gradients of Σ grad_out·out + grad_ladj·ladj w.r.t. x and the raw parameters (as csrc's backward_block;
    for the inverse, implicit differentiation through the forward map)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    inside, bin_index, onehot, x_k, w_k, y_k, h_k, d_k, d_k1, raw_k, raw_k1, t, bins, width_fraction, height_fraction, \
        value = _load_spline(x_ptr, p_ptr, rows, row_ok, _offsets(rows, count, stride_x, 1), num_bins, bound, min_width,
                             min_height, min_derivative, derivative_shift, INVERSE, BLOCK_K)
    g_y = tl.load(grad_out_ptr + _offsets(rows, count, stride_grad_out, 1), mask=row_ok, other=0.0)
    g_l = tl.load(grad_ladj_ptr + _offsets(rows, count, stride_ladj_row, stride_ladj_column), mask=row_ok, other=0.0)
    grad_x, g_width, g_height, g_derivative = rq_gradients(
        g_y, g_l, inside, bin_index, onehot, w_k, h_k, d_k, d_k1, raw_k, raw_k1, t, bins, width_fraction,
        height_fraction, num_bins, bound, min_width, min_height, INVERSE)
    base = grad_p_ptr + rows[:, None] * (3 * num_bins - 1)
    store_ok = row_ok[:, None] & (bins < num_bins)
    tl.store(base + bins, g_width, mask=store_ok)
    tl.store(base + num_bins + bins, g_height, mask=store_ok)
    tl.store(base + 2 * num_bins + bins, g_derivative, mask=row_ok[:, None] & (bins < num_bins - 1))
    tl.store(grad_x_ptr + rows, grad_x, mask=row_ok)


@triton.jit
def _spline_step_forward_kernel(p_ptr, kept_ptr, changed_ptr, column_map_ptr, ladj_in_ptr, y_ptr, ladj_ptr, n_rows, n_dim,
                                kept_0, n_kept, changed_0, n_changed, num_bins, stride_kept, stride_changed,
                                bound, min_width, min_height, min_derivative, derivative_shift, INVERSE: tl.constexpr,
                                HAS_LADJ_IN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_C: tl.constexpr):
    """One spline coupling layer from its conditioner's outputs p `(N, T·(3K-1))`: each changed coordinate's
    spline, the kept coordinates copied, both stored through the column map into y `(N, D)`;
    ladj = ladj_in + log|det J|."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    ladj = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_LADJ_IN:
        ladj += tl.load(ladj_in_ptr + rows, mask=row_ok, other=0.0)
    for t in range(n_changed):  # element (row, t) of the (N, T) splines: its 3K-1 parameters at (row·T + t)·(3K-1)
        inside, bin_index, onehot, x_k, w_k, y_k, h_k, d_k, d_k1, raw_k, raw_k1, u, bins, width_fraction, \
            height_fraction, value = _load_spline(changed_ptr, p_ptr, rows * n_changed + t, row_ok,
                                                  rows * stride_changed + t, num_bins, bound, min_width, min_height,
                                                  min_derivative, derivative_shift, INVERSE, BLOCK_K)
        result, logabsdet = _rq_value(u, x_k, w_k, y_k, h_k, d_k, d_k1, INVERSE)
        ladj += tl.where(inside, logabsdet, 0.0)
        column = tl.load(column_map_ptr + changed_0 + t)
        tl.store(y_ptr + rows * n_dim + column, tl.where(inside, result, value), mask=row_ok)  # outside: passed through
    copy_columns(kept_ptr, stride_kept, y_ptr, n_dim, column_map_ptr + kept_0, rows, row_ok, n_kept, BLOCK_C)
    tl.store(ladj_ptr + rows, ladj, mask=row_ok)


def _launch_meta(num_bins: int, block: int | None) -> dict:
    """BLOCK elements per program (default: 64, fewer for many bins so a (BLOCK, BLOCK_K) tile stays <= 4096
    values; on an H100, 8 bins, 64 elements per program ran 1.3x faster than 128 both ways,
    bench/results/gpu_sweep_2026-11-26_*) and the bin tile BLOCK_K."""
    block_k = max(2, next_power_of_2(num_bins))
    return dict(BLOCK=block or max(16, min(64, 4096 // block_k)), BLOCK_K=block_k)


def _layout(t) -> tuple[int, int]:
    """(row length, row stride) of the elements of x `(n,)` (contiguous: one row) or `(N, T)` (unit column
    stride, rows any stride apart): element i is at (i // T)·stride + i % T."""
    return (t.shape[1], t.stride(0)) if t.dim() == 2 else (1, 1)


def rq_spline_forward_triton(x, params, *, bound: float, inverse: bool, constants: tuple[float, float, float, float],
                             block: int | None = None, num_warps: int = 4):
    """x `(n,)` contiguous, or `(N, T)` with n = N·T (unit column stride, rows any stride apart: a column slice is
    read in place); params `(n, 3K-1)` contiguous; float32 on one device. constants: (min bin width, min bin
    height, min derivative, derivative shift); block, num_warps: elements and warps per program (launch tuning,
    not yet timed on a GPU). Returns out `(n,)` and log|det J| `(n,)`."""
    n, n_params = params.shape
    num_bins = (n_params + 1) // 3
    x = row_major(x) if x.dim() == 2 else x
    out, ladj = params.new_empty(n), params.new_empty(n)
    meta = _launch_meta(num_bins, block)
    _rq_forward_kernel[(cdiv(n, meta["BLOCK"]),)](x, params, out, ladj, n, num_bins, *_layout(x), float(bound), *constants,
                                                  INVERSE=inverse, **meta, num_warps=num_warps)
    return out, ladj


def rq_spline_backward_triton(x, params, grad_out, grad_ladj, *, bound: float, inverse: bool,
                              constants: tuple[float, float, float, float], block: int | None = None,
                              num_warps: int = 4):
    """Gradients w.r.t. x and params `(n, 3K-1)` for upstream gradients grad_out and grad_ladj, shaped as x
    (`rq_spline_forward_triton`): grad_out with x's layout rules, grad_ladj `(N, T)` with any strides (e.g. the
    expanded gradient of a row sum) or `(n,)` contiguous. Returns grad_x `(n,)` and grad_params."""
    n, n_params = params.shape
    num_bins = (n_params + 1) // 3
    if grad_out.shape != x.shape or grad_ladj.shape != x.shape:
        raise ValueError(f"upstream gradients {tuple(grad_out.shape)}, {tuple(grad_ladj.shape)} must be shaped as x {tuple(x.shape)}")
    if x.dim() == 2:
        x, grad_out = row_major(x), row_major(grad_out)
    grad_x, grad_params = params.new_empty(n), torch.empty_like(params)
    ladj_strides = tuple(grad_ladj.stride()) if grad_ladj.dim() == 2 else (1, 0)
    meta = _launch_meta(num_bins, block)
    _rq_backward_kernel[(cdiv(n, meta["BLOCK"]),)](x, params, grad_out, grad_ladj, grad_x, grad_params, n, num_bins,
                                                   *_layout(x), _layout(grad_out)[1], *ladj_strides, float(bound),
                                                   *constants, INVERSE=inverse, **meta, num_warps=num_warps)
    return grad_x, grad_params


def step_block_m(block_k: int) -> int:
    """Default rows per program of the spline step for a bin tile of `block_k`: a (rows, bins) tile of at most
    1,024 values, 16 to 64 rows."""
    return max(16, min(64, 1024 // block_k))


def spline_step_forward_triton(params, kept, changed, ladj_in, column_map, *, kept_0: int, changed_0: int, bound: float,
                               inverse: bool, constants: tuple[float, float, float, float], block_m: int | None = None,
                               num_warps: int = 4):
    """One spline coupling layer in a flow, without autograd, with the permutation after it.

    Arguments:
        params `(N, T·(3K-1))` contiguous: the conditioner's outputs, per changed coordinate its raw widths,
            heights and interior derivatives. kept `(N, K)`, changed `(N, T)`: the layer's input columns
            [kept_0, kept_0 + K) and [changed_0, changed_0 + T) (rows any stride apart). ladj_in `(N,)` or None:
            the log-determinant so far. column_map `(D,)` int32: where the output stores input column c.
        constants: (min bin width, min bin height, min derivative, derivative shift).
        block_m, num_warps: rows and warps per program (launch tuning; not yet timed on a GPU). The default keeps
            a (rows, bins) tile at most 1,024 values: 64 rows for 8 bins (117 registers, no spills on sm_90,
            bench/sm90.py `compile_spline_step`), 16 for 128 (224 B spilled; 64 rows spilled 10 KB).
    Returns:
        y `(N, D)` (the layer's output, permuted) and ladj_in + log|det J| `(N,)`.
    """
    kept, changed = row_major(kept), row_major(changed)
    n_rows, n_kept = kept.shape
    n_changed = changed.shape[1]
    num_bins = (params.shape[1] // max(n_changed, 1) + 1) // 3
    y, ladj = params.new_empty(n_rows, n_kept + n_changed), params.new_empty(n_rows)
    block_k = _launch_meta(num_bins, None)["BLOCK_K"]
    block_m = block_m or step_block_m(block_k)
    _spline_step_forward_kernel[(cdiv(n_rows, block_m),)](
        params, kept, changed, column_map, ladj if ladj_in is None else ladj_in, y, ladj, n_rows, n_kept + n_changed,
        kept_0, n_kept, changed_0, n_changed, num_bins, kept.stride(0), changed.stride(0), float(bound), *constants,
        INVERSE=inverse, HAS_LADJ_IN=ladj_in is not None, BLOCK_M=block_m, BLOCK_K=block_k,
        BLOCK_C=next_power_of_2(max(n_kept, 1)), num_warps=num_warps)
    return y, ladj
