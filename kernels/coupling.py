"""Fused coupling layers in Triton (affine and rational-quadratic spline): per block of rows, the
conditioner MLP (two hidden layers, SiLU) on [kept, context], the transform of the changed half and its
log-determinant, with the hidden activations kept on chip. Forward/inverse map; gradients come from
`fastflow.ops.coupling`. `coupling_flow_triton` runs a whole stack of such layers, with the permutations
between them, in one launch (`fastflow.ops.coupling_flow`).
"""

import functools

import torch
import triton
import triton.language as tl

from fastflow.kernels import cdiv, dot_tile, next_power_of_2, row_major
from fastflow.kernels.activations import SILU, TANH, activate, approximate_activations
from fastflow.kernels.affine import affine_map, affine_parameters, copy_columns, store_columns
from fastflow.kernels.spline import _rq_locate, _rq_value, _spline_knots

__all__ = ["FLOW_LAUNCH", "STEP_FIELDS", "affine_coupling_triton", "affine_meta", "coupling_flow_triton", "spline_coupling_triton", "spline_meta"]


@triton.jit
def first_layer(inputs, w1_ptr, b1_ptr, unit, unit_ok, cols_in, in_ok, n_in, PRECISION: tl.constexpr):
    """The conditioner's first-layer pre-activations of the units `unit` (valid where `unit_ok`) for inputs
    `(BLOCK_M, BLOCK_IN)` (columns valid where `in_ok`; w1 `(H, n_in)` row-major): `(BLOCK_M, len(unit))`."""
    w1 = tl.load(w1_ptr + unit[None, :] * n_in + cols_in[:, None], mask=in_ok[:, None] & unit_ok[None, :], other=0.0)
    return tl.dot(inputs, w1, input_precision=PRECISION) + tl.load(b1_ptr + unit, mask=unit_ok, other=0.0)[None, :]


def check_block_hk(block_hk: int | None) -> None:
    """Refuses a chunk of first-layer units (`block_hk`) that is not a power of 2 >= 16 (None: the default)."""
    if block_hk is not None and (block_hk < 16 or block_hk & (block_hk - 1)):
        raise ValueError(f"block_hk must be a power of 2 >= 16, got {block_hk}")


@triton.jit
def _conditioner_hidden(kept_ptr, context_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, rows, row_ok,
                        n_kept, n_context, n_hidden, stride_kept, stride_context, BLOCK_M: tl.constexpr,
                        BLOCK_IN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, PRECISION: tl.constexpr,
                        APPROXIMATE: tl.constexpr):
    """Second hidden layer `(BLOCK_M, BLOCK_H)` of the conditioner SiLU(W2 SiLU(W1 [kept, context] + b1) + b2),
    zero-padded; weights are (out, in) row-major and loaded transposed as (in, out) tiles. The first layer's
    units are taken BLOCK_HK at a time, each chunk multiplied into the second layer's accumulator at once,
    so a weight tile holds at most BLOCK_HK × BLOCK_H values (wide layers fit in shared memory). Rows of kept
    and context are `stride_kept` / `stride_context` elements apart (columns contiguous)."""
    cols_in = tl.arange(0, BLOCK_IN)
    cols_h = tl.arange(0, BLOCK_H)
    n_in = n_kept + n_context
    kept_mask = row_ok[:, None] & (cols_in[None, :] < n_kept)
    x_in = tl.load(kept_ptr + rows[:, None] * stride_kept + cols_in[None, :], mask=kept_mask, other=0.0)
    context_mask = row_ok[:, None] & (cols_in[None, :] >= n_kept) & (cols_in[None, :] < n_in)
    x_in += tl.load(context_ptr + rows[:, None] * stride_context + (cols_in - n_kept)[None, :], mask=context_mask, other=0.0)
    units = tl.arange(0, BLOCK_HK)
    pre_activation = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for start in range(0, BLOCK_H, BLOCK_HK):
        unit = start + units
        unit_ok = unit < n_hidden
        h = activate(first_layer(x_in, w1_ptr, b1_ptr, unit, unit_ok, cols_in, cols_in < n_in, n_in, PRECISION), SILU,
                     APPROXIMATE)
        w2 = tl.load(w2_ptr + cols_h[None, :] * n_hidden + unit[:, None], mask=unit_ok[:, None] & (cols_h[None, :] < n_hidden), other=0.0)
        pre_activation += tl.dot(h, w2, input_precision=PRECISION)
    b2 = tl.load(b2_ptr + cols_h, mask=cols_h < n_hidden, other=0.0)
    return activate(pre_activation + b2[None, :], SILU, APPROXIMATE)


@triton.jit
def _affine_layer(kept_ptr, context_ptr, changed_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, dst_ptr,
                  column_map_ptr, rows, row_ok, n_kept, n_context, n_hidden, n_changed, stride_kept, stride_context,
                  stride_changed, stride_dst, scale_bound, INVERSE: tl.constexpr, SCATTER: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr,
                  BLOCK_OUT: tl.constexpr, PRECISION: tl.constexpr, APPROXIMATE: tl.constexpr):
    """One affine coupling layer on a block of rows: stores the changed coordinates' images (`store_columns`)
    and returns log|det J| `(BLOCK_M,)`."""
    cols_out = tl.arange(0, BLOCK_OUT)
    h = _conditioner_hidden(kept_ptr, context_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, rows, row_ok, n_kept, n_context,
                            n_hidden, stride_kept, stride_context, BLOCK_M, BLOCK_IN, BLOCK_H, BLOCK_HK, PRECISION,
                            APPROXIMATE)

    raw_scale, shift, _, _ = affine_parameters(h, w3_ptr, b3_ptr, n_hidden, n_changed, BLOCK_H, BLOCK_OUT, PRECISION)
    changed_mask = row_ok[:, None] & (cols_out[None, :] < n_changed)
    changed = tl.load(changed_ptr + rows[:, None] * stride_changed + cols_out[None, :], mask=changed_mask, other=0.0)
    log_scale = scale_bound * activate(raw_scale / scale_bound, TANH, APPROXIMATE)
    out, ladj = affine_map(changed, shift, log_scale, changed_mask, INVERSE)
    store_columns(dst_ptr, stride_dst, column_map_ptr, rows, row_ok, cols_out, n_changed, out, SCATTER)
    return ladj


@triton.jit
def _affine_coupling_kernel(
    # pointers
    kept_ptr, context_ptr, changed_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr, ladj_ptr,
    # dimensions and row strides
    n_rows, n_kept, n_context, n_hidden, n_changed, stride_kept, stride_context, stride_changed,
    # scalars
    scale_bound,
    # meta-parameters
    INVERSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_OUT: tl.constexpr, PRECISION: tl.constexpr, APPROXIMATE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: N·D may pass 2^31
    row_ok = rows < n_rows
    ladj = _affine_layer(kept_ptr, context_ptr, changed_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr,
                         out_ptr, rows, row_ok, n_kept, n_context, n_hidden, n_changed, stride_kept, stride_context,
                         stride_changed, n_changed, scale_bound, INVERSE, False, BLOCK_M, BLOCK_IN, BLOCK_H, BLOCK_HK,
                         BLOCK_OUT, PRECISION, APPROXIMATE)
    tl.store(ladj_ptr + rows, ladj, mask=row_ok)


# Values in one weight tile (64 KiB of float32): conditioners up to width 128 load each layer whole; wider
# ones go in chunks (BLOCK_HK units, T_CHUNK coordinates), which keeps the kernels within an H100's shared
# memory (checked by compiling for sm_90: widths 128 and 256, dims 2 to 64, context 64).
_WEIGHT_TILE = 128 * 128


def _conditioner_meta(n_in: int, n_hidden: int, *, inverse: bool, block_m: int, precision: str,
                      approximate: bool, block_hk: int | None = None) -> dict:
    """Meta-parameters both kernels share: row block, conditioner tiles, chunk of first-layer units (`block_hk`, a
    power of 2 >= 16; default: as many as a weight tile holds), the products' input precision ("ieee": fp32,
    "tf32" or "tf32x3") and the activations' form (`kernels.activations`)."""
    block_h = dot_tile(n_hidden)
    check_block_hk(block_hk)
    return dict(INVERSE=inverse, BLOCK_M=block_m, BLOCK_IN=dot_tile(n_in), BLOCK_H=block_h,
                BLOCK_HK=min(block_h, block_hk or max(16, _WEIGHT_TILE // block_h)), PRECISION=precision, APPROXIMATE=approximate,
                num_stages=1)  # no software pipelining of the chunk loops: multi-buffered tiles overflow shared memory


def affine_meta(n_in: int, n_hidden: int, n_changed: int, *, inverse: bool, block_m: int = 64,
                precision: str = "ieee", approximate: bool = False, block_hk: int | None = None) -> dict:
    """The affine kernel's meta-parameters (constexprs and launch options) for these layer sizes."""
    return {**_conditioner_meta(n_in, n_hidden, inverse=inverse, block_m=block_m, precision=precision,
                               approximate=approximate, block_hk=block_hk),
            "BLOCK_OUT": dot_tile(n_changed)}


# (coordinate, bin) columns per pass of the spline kernel: from sm_90 compiles (bench/sm90.py, Triton 3.6; not yet
# timed), 16 columns keep the spline tiles in registers where whole-layer passes spill (width 128: 216 B at 8-D,
# 3.5 KB at 32-D down to 48 B / none; width 256, 64-D, context 64: 13 KB down to 0.9 KB), outputs unchanged.
SPLINE_CHUNK_COLUMNS = 16


def spline_meta(n_in: int, n_hidden: int, n_changed: int, num_bins: int, *, inverse: bool, block_m: int = 32,
                precision: str = "ieee", approximate: bool = False,
                chunk_columns: int | None = SPLINE_CHUNK_COLUMNS, block_hk: int | None = None) -> dict:
    """The spline kernel's meta-parameters: the (coordinate, bin) tile BLOCK_T × BLOCK_K (at least 16
    columns for tl.dot), taken T_CHUNK coordinates at a time: at most `chunk_columns` (coordinate, bin) columns
    per pass (None: as many as the weight-tile budget allows)."""
    meta = _conditioner_meta(n_in, n_hidden, inverse=inverse, block_m=block_m, precision=precision,
                             approximate=approximate, block_hk=block_hk)
    block_t, block_k = next_power_of_2(n_changed), next_power_of_2(num_bins)
    if block_t * block_k < 16:
        block_k = 16 // block_t
    columns = _WEIGHT_TILE // meta["BLOCK_H"] if chunk_columns is None else min(chunk_columns, _WEIGHT_TILE // meta["BLOCK_H"])
    t_chunk = min(block_t, max(16 // block_k, columns // block_k, 1))
    return {**meta, "BLOCK_T": block_t, "BLOCK_K": block_k, "T_CHUNK": t_chunk}


def _layer_inputs(kept, context, changed):
    """The kernels' row-major inputs and their row strides (a missing context: an empty tensor, stride 0)."""
    kept, changed = row_major(kept), row_major(changed)
    context = kept.new_empty(0, 0) if context is None else row_major(context)
    return kept, context, changed, (kept.stride(0), context.stride(0) if context.numel() else 0, changed.stride(0))


def affine_coupling_triton(kept, context, changed, weights, *, scale_bound: float, inverse: bool,
                           precision: str = "ieee", approximate: bool | None = None, block_m: int = 64,
                           num_warps: int = 4):
    """Launch the fused kernel.

    Arguments:
        kept `(N, K)`, context `(N, C)` or None, changed `(N, T)`: float32 on one device; column slices of
            wider tensors are read in place.
        weights: (w1 `(H, K+C)`, b1, w2 `(H, H)`, b2, w3 `(2T, H)`, b3 `(2T,)`) with w3's rows interleaved
            as (raw log-scale, shift) per changed coordinate.
        precision: the products' input precision, "ieee" (fp32), "tf32" or "tf32x3".
        approximate: activations through the GPU's approximate tanh (`kernels.activations`); None: for TF32
            products on an NVIDIA GPU.
        block_m, num_warps: rows per program and warps per program (launch tuning).
    Returns:
        out `(N, T)` and log|det J| `(N,)`.
    """
    kept, context, changed, strides = _layer_inputs(kept, context, changed)
    n_rows, n_changed = changed.shape
    out = changed.new_empty(n_rows, n_changed)
    ladj = changed.new_empty(n_rows)
    grid = (cdiv(n_rows, block_m),)
    _affine_coupling_kernel[grid](
        kept, context, changed, *(w.contiguous() for w in weights), out, ladj,
        n_rows, kept.shape[1], context.shape[1], weights[0].shape[0], n_changed, *strides,
        float(scale_bound),
        **affine_meta(kept.shape[1] + context.shape[1], weights[0].shape[0], n_changed, inverse=inverse, block_m=block_m,
                      precision=precision, approximate=approximate_activations(precision, kept.device, approximate)),
        num_warps=num_warps,
    )
    return out, ladj


@triton.jit
def _spline_parameters(h, w3_ptr, b3_ptr, parameter_rows, ok, cols_h, n_hidden, PRECISION: tl.constexpr):
    """The conditioner outputs `parameter_rows (P,)` (rows of w3 `(·, H)` and b3) for h `(BLOCK_M, BLOCK_H)`:
    `(BLOCK_M, P)`, zero where not `ok`."""
    weights = tl.load(w3_ptr + parameter_rows[None, :] * n_hidden + cols_h[:, None],
                      mask=ok[None, :] & (cols_h[:, None] < n_hidden), other=0.0)
    return tl.dot(h, weights, input_precision=PRECISION) + tl.load(b3_ptr + parameter_rows, mask=ok, other=0.0)[None, :]


@triton.jit
def _spline_layer(kept_ptr, context_ptr, changed_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, dst_ptr,
                  column_map_ptr, rows, row_ok, n_kept, n_context, n_hidden, n_changed, num_bins, stride_kept,
                  stride_context, stride_changed, stride_dst, bound, min_width, min_height, min_derivative,
                  derivative_shift, INVERSE: tl.constexpr, SCATTER: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_IN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_K: tl.constexpr, T_CHUNK: tl.constexpr, PRECISION: tl.constexpr, APPROXIMATE: tl.constexpr):
    """One spline coupling layer on a block of rows: stores the changed coordinates' images (`store_columns`)
    and returns log|det J| `(BLOCK_M,)`."""
    cols_h = tl.arange(0, BLOCK_H)
    h = _conditioner_hidden(kept_ptr, context_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, rows, row_ok, n_kept, n_context,
                            n_hidden, stride_kept, stride_context, BLOCK_M, BLOCK_IN, BLOCK_H, BLOCK_HK, PRECISION,
                            APPROXIMATE)

    # the changed coordinates T_CHUNK at a time (a weight tile holds T_CHUNK · BLOCK_K × BLOCK_H values)
    bins = tl.arange(0, BLOCK_K)[None, None, :]
    bin_ok = bins < num_bins
    n_params = 3 * num_bins - 1
    ladj = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t_0 in range(0, BLOCK_T, T_CHUNK):
        # (coordinate, bin) pairs, coordinate-major; coordinate t's outputs are w3's rows t·(3K-1) + [widths (K),
        # heights (K), interior derivatives (K-1)]: bin k's left knot has derivative k-1, its right knot k
        pair = tl.arange(0, T_CHUNK * BLOCK_K)
        coordinate, k = t_0 + pair // BLOCK_K, pair % BLOCK_K
        first = coordinate * n_params
        in_bins = (coordinate < n_changed) & (k < num_bins)
        raw_width = _spline_parameters(h, w3_ptr, b3_ptr, first + k, in_bins, cols_h, n_hidden, PRECISION)
        raw_height = _spline_parameters(h, w3_ptr, b3_ptr, first + num_bins + k, in_bins, cols_h, n_hidden, PRECISION)
        raw_dleft = _spline_parameters(h, w3_ptr, b3_ptr, first + 2 * num_bins + k - 1, in_bins & (k >= 1), cols_h,
                                       n_hidden, PRECISION)
        raw_dright = _spline_parameters(h, w3_ptr, b3_ptr, first + 2 * num_bins + k, in_bins & (k <= num_bins - 2),
                                        cols_h, n_hidden, PRECISION)
        raw_width = tl.reshape(raw_width, (BLOCK_M, T_CHUNK, BLOCK_K))
        raw_height = tl.reshape(raw_height, (BLOCK_M, T_CHUNK, BLOCK_K))
        raw_dleft = tl.reshape(raw_dleft, (BLOCK_M, T_CHUNK, BLOCK_K))
        raw_dright = tl.reshape(raw_dright, (BLOCK_M, T_CHUNK, BLOCK_K))

        _, widths, left_x = _spline_knots(raw_width, bins, bin_ok, bound, min_width, num_bins)
        _, heights, left_y = _spline_knots(raw_height, bins, bin_ok, bound, min_height, num_bins)
        cols_t = t_0 + tl.arange(0, T_CHUNK)
        changed_mask = row_ok[:, None] & (cols_t[None, :] < n_changed)
        value = tl.load(changed_ptr + rows[:, None] * stride_changed + cols_t[None, :], mask=changed_mask, other=0.0)
        inside, bin_index, onehot, x_k, w_k, y_k, h_k, d_k, d_k1, raw_k, raw_k1, t = _rq_locate(
            value, widths, left_x, heights, left_y, raw_dleft, raw_dright, bins, bin_ok, num_bins, bound,
            min_derivative, derivative_shift, INVERSE)
        result, logabsdet = _rq_value(t, x_k, w_k, y_k, h_k, d_k, d_k1, INVERSE)
        result = tl.where(inside, result, value)
        ladj += tl.sum(tl.where(inside & changed_mask, logabsdet, 0.0), axis=1)
        store_columns(dst_ptr, stride_dst, column_map_ptr, rows, row_ok, cols_t, n_changed, result, SCATTER)
    return ladj


@triton.jit
def _spline_coupling_kernel(
    # pointers
    kept_ptr, context_ptr, changed_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr, ladj_ptr,
    # dimensions and row strides
    n_rows, n_kept, n_context, n_hidden, n_changed, num_bins, stride_kept, stride_context, stride_changed,
    # scalars
    bound, min_width, min_height, min_derivative, derivative_shift,
    # meta-parameters
    INVERSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, T_CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    APPROXIMATE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: N·D may pass 2^31
    row_ok = rows < n_rows
    ladj = _spline_layer(kept_ptr, context_ptr, changed_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr,
                         out_ptr, rows, row_ok, n_kept, n_context, n_hidden, n_changed, num_bins, stride_kept,
                         stride_context, stride_changed, n_changed, bound, min_width, min_height, min_derivative,
                         derivative_shift, INVERSE, False, BLOCK_M, BLOCK_IN, BLOCK_H, BLOCK_HK, BLOCK_T, BLOCK_K,
                         T_CHUNK, PRECISION, APPROXIMATE)
    tl.store(ladj_ptr + rows, ladj, mask=row_ok)


def spline_coupling_triton(kept, context, changed, weights, *, num_bins: int, bound: float, inverse: bool,
                           constants: tuple[float, float, float, float], precision: str = "ieee",
                           approximate: bool | None = None, block_m: int = 32, num_warps: int = 4,
                           chunk_columns: int | None = SPLINE_CHUNK_COLUMNS):
    """Launch the fused spline coupling kernel.

    Arguments:
        kept `(N, K)`, context `(N, C)` or None, changed `(N, T)`: float32 on one device; column slices of
            wider tensors are read in place.
        weights: (w1, b1, w2, b2, w3 `(T·(3B-1), H)`, b3) of the conditioner (B = num_bins), read as they are.
        constants: (min bin width, min bin height, min derivative, derivative shift) of the reference.
        precision: the products' input precision, "ieee" (fp32), "tf32" or "tf32x3".
        approximate: activations through the GPU's approximate tanh (`kernels.activations`); None: for TF32
            products on an NVIDIA GPU.
        block_m, num_warps, chunk_columns: rows per program, warps per program and (coordinate, bin) columns
            per pass (launch tuning, `spline_meta`).
    Returns:
        out `(N, T)` and log|det J| `(N,)`.
    """
    kept, context, changed, strides = _layer_inputs(kept, context, changed)
    n_rows, n_changed = changed.shape
    n_hidden = weights[0].shape[0]
    meta = spline_meta(kept.shape[1] + context.shape[1], n_hidden, n_changed, num_bins, inverse=inverse, block_m=block_m,
                       precision=precision, approximate=approximate_activations(precision, kept.device, approximate),
                       chunk_columns=chunk_columns)
    out = changed.new_empty(n_rows, n_changed)
    ladj = changed.new_empty(n_rows)
    grid = (cdiv(n_rows, block_m),)
    _spline_coupling_kernel[grid](
        kept, context, changed, *(w.contiguous() for w in weights), out, ladj,
        n_rows, kept.shape[1], context.shape[1], n_hidden, n_changed, num_bins, *strides,
        float(bound), *constants, **meta, num_warps=num_warps,
    )
    return out, ladj


# Launch defaults of the fused run, from the H100 sweep (bench/results/gpu_sweep_2026-11-26_NVIDIA-H100-80GB-HBM3.json,
# TF32, width 128, 5 layers, 65,536 rows): 64 rows, first-layer units 32 at a time, 4 warps per program: spline 8-D
# 0.62 ms, 32-D 1.77 ms, affine 8-D 0.38 ms, where 8 warps took 0.88 / 2.11 / 0.54 ms (32-D splines ran fastest
# at 128 rows and 8 warps, 1.47 ms). With 4 warps the sm_90 build spills 380-680 B per thread (bench/sm90.py
# `compile_coupling_flow`; 8 warps: none), yet two programs share an SM where one 8-warp program of 255
# registers per thread fills its register file.
FLOW_LAUNCH = {"block_m": 64, "block_hk": 32, "num_warps": 4}

# Per step of a fused run of coupling layers, the int32 fields of its row in the steps table: where the kept and
# changed coordinates start and how many there are, then the offsets of w1, b1, w2, b2, w3, b3 in the packed
# parameters (`coupling_flow_triton`).
STEP_FIELDS = 10


@triton.jit
def state_elements(n_rows, n_dim):
    """N·D as int64 (a state's elements may pass 2^31; the arguments may be i32 or Python ints)."""
    return (tl.program_id(0).to(tl.int64) * 0 + n_rows) * n_dim


@triton.jit
def _coupling_flow_kernel(
    # pointers
    x_ptr, context_ptr, out_ptr, states_ptr, ladj_ptr, steps_ptr, column_maps_ptr, params_ptr,
    # dimensions
    n_rows, n_dim, n_context, n_hidden, n_steps, n_slots, num_bins, stride_context,
    # scalars: the affine layers' scale bound, the spline layers' bound and constants
    scale_bound, bound, min_width, min_height, min_derivative, derivative_shift,
    # meta-parameters
    SPLINE: tl.constexpr, INVERSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_IN: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    T_CHUNK: tl.constexpr, PRECISION: tl.constexpr, APPROXIMATE: tl.constexpr, FIELDS: tl.constexpr,
):
    """Every step (coupling layer, then the permutation after it as a column map of its stores) on a block of rows:
    step s reads the state written by step s-1 (x for the first) and writes the whole new state to out (the last
    step) or to slot s % n_slots of states `(n_slots, N, D)`: two slots alternate, or one per step to keep every
    step's input for the backward (`kernels.coupling_backward`); the log-determinants add up in registers."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: N·D may pass 2^31
    row_ok = rows < n_rows
    state_size = state_elements(n_rows, n_dim)
    ladj = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s in range(n_steps):
        step = steps_ptr + s * FIELDS
        kept_0, n_kept, changed_0, n_changed = tl.load(step), tl.load(step + 1), tl.load(step + 2), tl.load(step + 3)
        w1, b1, w2, b2 = params_ptr + tl.load(step + 4), params_ptr + tl.load(step + 5), params_ptr + tl.load(step + 6), params_ptr + tl.load(step + 7)
        w3, b3 = params_ptr + tl.load(step + 8), params_ptr + tl.load(step + 9)
        column_map = column_maps_ptr + s * n_dim
        dst = states_ptr + (s % n_slots) * state_size
        if s == n_steps - 1:
            dst = out_ptr
        src = x_ptr
        if s > 0:
            src = states_ptr + ((s - 1) % n_slots) * state_size
        # the kept coordinates pass through (to their permuted columns)
        copy_columns(src + kept_0, n_dim, dst, n_dim, column_map + kept_0, rows, row_ok, n_kept, BLOCK_D)
        if SPLINE:
            ladj += _spline_layer(src + kept_0, context_ptr, src + changed_0, w1, b1, w2, b2, w3, b3, dst,
                                  column_map + changed_0, rows, row_ok, n_kept, n_context, n_hidden, n_changed, num_bins,
                                  n_dim, stride_context, n_dim, n_dim, bound, min_width, min_height, min_derivative,
                                  derivative_shift, INVERSE, True, BLOCK_M, BLOCK_IN, BLOCK_H, BLOCK_HK, BLOCK_T, BLOCK_K,
                                  T_CHUNK, PRECISION, APPROXIMATE)
        else:
            ladj += _affine_layer(src + kept_0, context_ptr, src + changed_0, w1, b1, w2, b2, w3, b3, dst,
                                  column_map + changed_0, rows, row_ok, n_kept, n_context, n_hidden, n_changed, n_dim,
                                  stride_context, n_dim, n_dim, scale_bound, INVERSE, True, BLOCK_M, BLOCK_IN, BLOCK_H,
                                  BLOCK_HK, BLOCK_OUT, PRECISION, APPROXIMATE)
        tl.debug_barrier()  # this step's stores are visible to every thread of the program before the next reads
    tl.store(ladj_ptr + rows, ladj, mask=row_ok)


@functools.lru_cache(maxsize=256)
def _flow_meta(spline: bool, max_inputs: int, n_hidden: int, max_changed: int, num_bins: int | None, inverse: bool,
               block_m: int, precision: str, approximate: bool, chunk_columns: int | None, block_hk: int | None) -> dict:
    """The fused run's meta-parameters (computed once per size: launches are host-bound at GPU batch sizes)."""
    if spline:
        meta = spline_meta(max_inputs, n_hidden, max_changed, num_bins, inverse=inverse, block_m=block_m,
                           precision=precision, approximate=approximate, chunk_columns=chunk_columns, block_hk=block_hk)
        return {**meta, "BLOCK_OUT": 16}  # unused by the spline layers
    meta = affine_meta(max_inputs, n_hidden, max_changed, inverse=inverse, block_m=block_m, precision=precision,
                       approximate=approximate, block_hk=block_hk)
    return {**meta, "BLOCK_T": 1, "BLOCK_K": 16, "T_CHUNK": 1}  # unused by the affine layers


def coupling_flow_triton(x, context, params, steps, column_maps, *, n_hidden: int, max_inputs: int, max_changed: int,
                         inverse: bool, scale_bound: float | None = None, num_bins: int | None = None,
                         bound: float | None = None, constants: tuple[float, float, float, float] | None = None,
                         precision: str = "ieee", approximate: bool | None = None,
                         block_m: int = FLOW_LAUNCH["block_m"], block_hk: int | None = FLOW_LAUNCH["block_hk"],
                         num_warps: int = FLOW_LAUNCH["num_warps"], chunk_columns: int | None = SPLINE_CHUNK_COLUMNS,
                         keep_states: bool = False):
    """Run S coupling layers of one kind (affine when `scale_bound` is given, else spline with `num_bins`, `bound`,
    `constants` as `spline_coupling_triton`), each followed by a column permutation, in one launch.

    Arguments:
        x `(N, D)`: the input states, float32 with contiguous rows; context `(N, C)` or None (rows any stride
            apart, e.g. 0 for one context shared by every row).
        params: every layer's (w1, b1, w2, b2, w3, b3), flattened into one float32 tensor.
        steps `(S, STEP_FIELDS)` int32: per step in execution order, (kept start, kept count, changed start,
            changed count) in the state's columns and the offsets of the layer's weights in `params`.
        column_maps `(S, D)` int32: where step s stores state column c (the permutation after the layer).
        n_hidden: the conditioners' width; max_inputs, max_changed: the largest kept + context and changed
            counts over the steps (they set the tiles).
        inverse: apply each layer's inverse (the steps are already in execution order).
        precision, approximate, chunk_columns: as the per-layer launchers; block_m, block_hk, num_warps: rows,
            first-layer units per chunk and warps per program (`FLOW_LAUNCH`).
        keep_states: also return the inputs of steps 1 … S-1 (for `kernels.coupling_backward.coupling_flow_backward_triton`).
    Returns:
        the final states `(N, D)` and the summed log|det J| `(N,)`; with `keep_states`, then the states `(S-1, N, D)`.
    """
    n_rows, n_dim = x.shape
    spline = scale_bound is None
    meta = _flow_meta(spline, max_inputs, n_hidden, max_changed, num_bins, inverse, block_m, precision,
                      approximate_activations(precision, x.device, approximate), chunk_columns, block_hk)
    context = x.new_empty(0, 0) if context is None else row_major(context)
    n_steps = steps.shape[0]
    n_slots = max(1, n_steps - 1 if keep_states else min(2, n_steps - 1))  # (one step: no state between steps)
    out, states, ladj = torch.empty_like(x), x.new_empty(n_slots, n_rows, n_dim), x.new_empty(n_rows)
    spline_scalars = (float(bound), *constants) if spline else (0.0,) * 5
    _coupling_flow_kernel[(cdiv(n_rows, meta["BLOCK_M"]),)](
        x, context, out, states, ladj, steps, column_maps, params,
        n_rows, n_dim, context.shape[1], n_hidden, n_steps, n_slots, num_bins or 0, context.stride(0) if context.numel() else 0,
        0.0 if spline else float(scale_bound), *spline_scalars,
        SPLINE=spline, BLOCK_D=next_power_of_2(n_dim), FIELDS=STEP_FIELDS, **meta, num_warps=num_warps,
    )
    return (out, ladj, states[: n_steps - 1]) if keep_states else (out, ladj)
