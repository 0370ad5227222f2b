"""The backward of a fused run of coupling layers (`kernels.coupling.coupling_flow_triton` with `keep_states`),
affine or spline, for training: one Triton launch for the gradients of the inputs and per-row factors, then the
weight gradients as batched cuBLAS products. In the kernel, per block of rows (one per program) and step, last to
first, the conditioner is recomputed from the step's input state, then the gradients flow back through the
transform (the affine map, or the splines T_CHUNK coordinates at a time as the forward, through
`kernels.spline.rq_gradients`), the last layer and both SiLU hidden layers to the step's input and the context, on
chip; rows are independent, so no grid-wide barrier is needed between steps. Each step's weight gradients are sums
over rows of outer products (w2's: Σ g_a2ᵀ h1), so the kernel stores the factors (the conditioner's inputs, h1, h2,
and the gradients of a1, a2 and of the conditioner's outputs; `(S, rows, ·)`) and `_summed_products` adds them up,
one batched product per chunk of rows (deterministic); they take S · rows · (inputs + 4 H + outputs) float32 values
(0.7 GB at 65,536 rows, 5 layers, width 128, 8-D), launches taking fewer rows where they would pass `FACTOR_BUDGET`.
The first hidden layer's units go BLOCK_HK at a time, both
ways (a1 recomputed on the way back), as the forward's. sm_90 builds (Triton 3.6, width 128, 64 rows; bench/sm90.py):
affine (8 warps) 64 KiB of shared memory, 1.0 KiB of spills per thread and 4,792 SASS instructions with 16 units per
chunk (1.3 KiB, 5,656 with 32; 1.7 KiB with 64), spline 8-D (4 warps) 36 KiB, 2.2 KiB, 9,928 (2.8 KiB with 32). This replaced
sums inside the kernel (each program summing its blocks' weight gradients in registers and in a row of partials:
132 KiB, 3.6 KiB of spills, 11,552 instructions, one program per multiprocessor; on an H100 the affine backward took
3.7 ms at 8-D, 65,536 rows, 2.7 ms with 128 rows per block: no faster than the layer steps), and is not yet timed on
a GPU, so CUDA trains through the layer steps unless asked (`fastflow.ops.coupling_flow.trains_fused`).

On an H100 (Triton 3.6, bench/results/gpu_fused_backward_2026-11-26_NVIDIA-H100-80GB-HBM3.json) the earlier spline
kernel at 64 rows x 8 warps read shared memory past its allocation for 4 and 16 changed coordinates
(compute-sanitizer: an illegal address; a miscompile, the interpreter's bounds are clean), so splines launch 4 warps
by default (then sanitizer-clean at 1, 4 and 16 changed coordinates).

Conditioners of width <= 128 with up to 128 inputs, 64 changed coordinates and 32 bins (`fits`: every size the
coupling layers promise, data and context dims up to 64, and beyond). Each weight tile is loaded where each product
needs it (one orientation each: TF32 products read their second operand one way only), not kept live across the
block, which took 176 KiB of shared memory at 8-D and 245 KiB with 96 inputs.
"""

import torch
import triton
import triton.language as tl

from fastflow.kernels import cdiv, dot_tile
from fastflow.kernels.activations import SILU, TANH, activate, silu_derivative
from fastflow.kernels.affine import affine_gradients, gather_columns
from fastflow.kernels.coupling import (
    STEP_FIELDS, _spline_parameters, check_block_hk, first_layer, spline_meta, state_elements,
)
from fastflow.kernels.spline import _rq_locate, _spline_knots, rq_gradients

__all__ = ["MAX_HIDDEN", "conditioner_outputs", "coupling_flow_backward_triton", "default_warps", "factor_rows", "fits",
           "gradient_index"]

MAX_HIDDEN = 128
MAX_SIZES = (MAX_HIDDEN, 128, 64, 32)  # the largest width, inputs (kept + context), changed coordinates and bins
FACTOR_BUDGET = 1 << 28  # float32 values (1 GiB) of per-row factors per launch at most, by default
CHUNK_ROWS = 4096  # rows per batched product of the weight gradients (about)
BLOCK_HK = 16  # first-layer units per chunk by default (sm_90 builds spilled less than with 32 or 64: module docstring)


@triton.jit
def _affine_last_backward(h2, src, grad_src, grad_dst, g_raw, column_map, rows, row_ok, factor_ok, g_ladj, w3_ptr,
                          b3_ptr, changed_0, n_changed, max_changed, n_hidden, n_dim, scale_bound, cols_h, h_ok,
                          INVERSE: tl.constexpr, PRECISION: tl.constexpr, APPROXIMATE: tl.constexpr,
                          BLOCK_OUT: tl.constexpr):
    """An affine layer's last conditioner layer and map on a block of rows, backward: stores the changed
    coordinates' gradients and the gradients of the last layer's outputs at g_raw (the block's row pointers; each
    row's (raw log-scale, shift) pairs as w3 lays them out, zero past the layer's own); returns the gradient of the
    last hidden activations h2 `(BLOCK_M, BLOCK_H)`."""
    cols_out = tl.arange(0, BLOCK_OUT)
    out_ok = cols_out < n_changed
    w3_mask = h_ok[:, None] & out_ok[None, :]
    w_scale = tl.load(w3_ptr + (2 * cols_out)[None, :] * n_hidden + cols_h[:, None], mask=w3_mask, other=0.0)
    w_shift = tl.load(w3_ptr + (2 * cols_out + 1)[None, :] * n_hidden + cols_h[:, None], mask=w3_mask, other=0.0)
    raw_scale = tl.dot(h2, w_scale, input_precision=PRECISION) + tl.load(b3_ptr + 2 * cols_out, mask=out_ok, other=0.0)[None, :]
    shift = tl.dot(h2, w_shift, input_precision=PRECISION) + tl.load(b3_ptr + 2 * cols_out + 1, mask=out_ok, other=0.0)[None, :]
    changed_mask = row_ok[:, None] & out_ok[None, :]
    x = tl.load(src + changed_0 + rows[:, None] * n_dim + cols_out[None, :], mask=changed_mask, other=0.0)
    squashed = activate(raw_scale / scale_bound, TANH, APPROXIMATE)
    g_out = gather_columns(grad_src, n_dim, column_map + changed_0, rows, row_ok, cols_out, n_changed)
    g_x, g_shift, g_raw_scale = affine_gradients(x, shift, scale_bound * squashed, squashed, g_out, g_ladj[:, None], INVERSE)
    g_shift = tl.where(changed_mask, g_shift, 0.0)
    g_raw_scale = tl.where(changed_mask, g_raw_scale, 0.0)
    tl.store(grad_dst + changed_0 + rows[:, None] * n_dim + cols_out[None, :], g_x, mask=changed_mask)
    slots = factor_ok[:, None] & (cols_out < max_changed)[None, :]
    tl.store(g_raw + (2 * cols_out)[None, :], g_raw_scale, mask=slots)
    tl.store(g_raw + (2 * cols_out + 1)[None, :], g_shift, mask=slots)
    # (the last layer's rows again, (out, in) as the products back to h2 read them)
    w3_mask = out_ok[:, None] & h_ok[None, :]
    w_scale = tl.load(w3_ptr + (2 * cols_out)[:, None] * n_hidden + cols_h[None, :], mask=w3_mask, other=0.0)
    w_shift = tl.load(w3_ptr + (2 * cols_out + 1)[:, None] * n_hidden + cols_h[None, :], mask=w3_mask, other=0.0)
    return (tl.dot(g_raw_scale, w_scale, input_precision=PRECISION)
            + tl.dot(g_shift, w_shift, input_precision=PRECISION))


@triton.jit
def _output_gradients(g_params, w3_ptr, g_raw, parameter_rows, ok, slot_ok, row_ok, factor_ok, n_hidden, cols_h, h_ok,
                      PRECISION: tl.constexpr):
    """For the gradients g_params `(BLOCK_M, P)` of the conditioner outputs `parameter_rows (P,)` (valid where
    `ok`): stores them at g_raw (the block's row pointers; zero in the other `slot_ok` slots) and returns their part
    of h2's gradient."""
    g_params = tl.where(row_ok[:, None] & ok[None, :], g_params, 0.0)
    tl.store(g_raw + parameter_rows[None, :], g_params, mask=factor_ok[:, None] & slot_ok[None, :])
    weights = tl.load(w3_ptr + parameter_rows[:, None] * n_hidden + cols_h[None, :], mask=ok[:, None] & h_ok[None, :],
                      other=0.0)
    return tl.dot(g_params, weights, input_precision=PRECISION)


@triton.jit
def _spline_last_backward(h2, src, grad_src, grad_dst, g_raw, column_map, rows, row_ok, factor_ok, g_ladj, w3_ptr,
                          b3_ptr, changed_0, n_changed, max_changed, n_hidden, n_dim, num_bins, bound, min_width,
                          min_height, min_derivative, derivative_shift, cols_h, h_ok, INVERSE: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_K: tl.constexpr, T_CHUNK: tl.constexpr):
    """A spline layer's last conditioner layer and splines on a block of rows, backward, T_CHUNK coordinates at a
    time as the forward (`kernels.coupling._spline_layer`): stores the changed coordinates' gradients and those of
    the last layer's outputs at g_raw (the block's row pointers, as w3 lays them out, zero past the layer's own);
    returns the gradient of h2 `(BLOCK_M, BLOCK_H)`."""
    bins = tl.arange(0, BLOCK_K)[None, None, :]
    bin_ok = bins < num_bins
    n_params = 3 * num_bins - 1
    g_h2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for t_0 in range(0, BLOCK_T, T_CHUNK):
        pair = tl.arange(0, T_CHUNK * BLOCK_K)
        coordinate, k = t_0 + pair // BLOCK_K, pair % BLOCK_K
        first = coordinate * n_params
        in_bins = (coordinate < n_changed) & (k < num_bins)
        derivative_ok = in_bins & (k <= num_bins - 2)  # slot k: the interior derivative at knot k + 1
        bin_slot = (coordinate < max_changed) & (k < num_bins)
        derivative_slot = bin_slot & (k <= num_bins - 2)
        raw_width = _spline_parameters(h2, w3_ptr, b3_ptr, first + k, in_bins, cols_h, n_hidden, PRECISION)
        raw_height = _spline_parameters(h2, w3_ptr, b3_ptr, first + num_bins + k, in_bins, cols_h, n_hidden, PRECISION)
        raw_dleft = _spline_parameters(h2, w3_ptr, b3_ptr, first + 2 * num_bins + k - 1, in_bins & (k >= 1), cols_h,
                                       n_hidden, PRECISION)
        raw_dright = _spline_parameters(h2, w3_ptr, b3_ptr, first + 2 * num_bins + k, derivative_ok, cols_h, n_hidden,
                                        PRECISION)
        width_fraction, widths, left_x = _spline_knots(tl.reshape(raw_width, (BLOCK_M, T_CHUNK, BLOCK_K)), bins, bin_ok,
                                                       bound, min_width, num_bins)
        height_fraction, heights, left_y = _spline_knots(tl.reshape(raw_height, (BLOCK_M, T_CHUNK, BLOCK_K)), bins,
                                                         bin_ok, bound, min_height, num_bins)
        cols_t = t_0 + tl.arange(0, T_CHUNK)
        changed_mask = row_ok[:, None] & (cols_t[None, :] < n_changed)
        value = tl.load(src + changed_0 + rows[:, None] * n_dim + cols_t[None, :], mask=changed_mask, other=0.0)
        inside, bin_index, onehot, x_k, w_k, y_k, h_k, d_k, d_k1, raw_k, raw_k1, t = _rq_locate(
            value, widths, left_x, heights, left_y, tl.reshape(raw_dleft, (BLOCK_M, T_CHUNK, BLOCK_K)),
            tl.reshape(raw_dright, (BLOCK_M, T_CHUNK, BLOCK_K)), bins, bin_ok, num_bins, bound, min_derivative,
            derivative_shift, INVERSE)
        g_out = gather_columns(grad_src, n_dim, column_map + changed_0, rows, row_ok, cols_t, n_changed)
        g_l = tl.where(changed_mask, g_ladj[:, None], 0.0)
        g_x, g_width, g_height, g_derivative = rq_gradients(
            g_out, g_l, inside, bin_index, onehot, w_k, h_k, d_k, d_k1, raw_k, raw_k1, t, bins, width_fraction,
            height_fraction, num_bins, bound, min_width, min_height, INVERSE)
        tl.store(grad_dst + changed_0 + rows[:, None] * n_dim + cols_t[None, :], g_x, mask=changed_mask)
        g_h2 += _output_gradients(tl.reshape(g_width, (BLOCK_M, T_CHUNK * BLOCK_K)), w3_ptr, g_raw, first + k, in_bins,
                                  bin_slot, row_ok, factor_ok, n_hidden, cols_h, h_ok, PRECISION)
        g_h2 += _output_gradients(tl.reshape(g_height, (BLOCK_M, T_CHUNK * BLOCK_K)), w3_ptr, g_raw,
                                  first + num_bins + k, in_bins, bin_slot, row_ok, factor_ok, n_hidden, cols_h, h_ok,
                                  PRECISION)
        g_h2 += _output_gradients(tl.reshape(g_derivative, (BLOCK_M, T_CHUNK * BLOCK_K)), w3_ptr, g_raw,
                                  first + 2 * num_bins + k, derivative_ok, derivative_slot, row_ok, factor_ok, n_hidden,
                                  cols_h, h_ok, PRECISION)
    return g_h2


@triton.jit
def _coupling_flow_backward_kernel(
    # pointers
    x_ptr, states_ptr, context_ptr, grad_out_ptr, grad_ladj_ptr, grad_x_ptr, grad_states_ptr, grad_context_ptr,
    inputs_ptr, h1_ptr, g_a1_ptr, h2_ptr, g_a2_ptr, g_raw_ptr, steps_ptr, column_maps_ptr, params_ptr,
    # dimensions
    n_rows, row_0, n_group, n_dim, n_context, n_hidden, n_steps, max_inputs, max_changed, n_outputs, num_bins,
    stride_context,
    # scalars: the affine layers' scale bound, the spline layers' bound and constants
    scale_bound, bound, min_width, min_height, min_derivative, derivative_shift,
    # meta-parameters
    SPLINE: tl.constexpr, CONTEXT_GRAD: tl.constexpr, INVERSE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_IN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, T_CHUNK: tl.constexpr, PRECISION: tl.constexpr, APPROXIMATE: tl.constexpr,
    FIELDS: tl.constexpr,
):
    """Gradients of Σ grad_out·out + grad_ladj·ladj of the run w.r.t. x and the context, and each step's per-row
    factors of its weight gradients, for the rows row_0 + [0, n_group) (one block per program, through every step,
    last to first). Step s's input is x (s = 0) or states[s - 1]; the gradient of step s's output is grad_out (last
    step) or a slot of grad_states `(2, N, D)` that step s + 1 wrote. The factors `(S, n_group, ·)`: the conditioner's
    inputs [kept, context] (max_inputs columns), hidden activations h1, h2 and the gradients of their
    pre-activations g_a1, g_a2 (n_hidden columns each), and the gradients of its outputs g_raw (n_outputs); zero in
    rows past n_rows and in columns past the step's own."""
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    factor_ok = local < n_group
    rows = row_0 + local.to(tl.int64)  # int64: N·D may pass 2^31
    row_ok = rows < n_rows
    state_size = state_elements(n_rows, n_dim)
    cols_in = tl.arange(0, BLOCK_IN)
    cols_h = tl.arange(0, BLOCK_H)
    h_ok = cols_h < n_hidden
    h_slots = factor_ok[:, None] & h_ok[None, :]
    units = tl.arange(0, BLOCK_HK)
    for r in range(n_steps):
        s = n_steps - 1 - r
        step = steps_ptr + s * FIELDS
        kept_0, n_kept, changed_0, n_changed = tl.load(step), tl.load(step + 1), tl.load(step + 2), tl.load(step + 3)
        w1_ptr, b1_ptr = params_ptr + tl.load(step + 4), params_ptr + tl.load(step + 5)
        w2_ptr, b2_ptr = params_ptr + tl.load(step + 6), params_ptr + tl.load(step + 7)
        w3_ptr, b3_ptr = params_ptr + tl.load(step + 8), params_ptr + tl.load(step + 9)
        column_map = column_maps_ptr + s * n_dim
        n_in = n_kept + n_context
        in_ok = cols_in < n_in
        src = x_ptr
        if s > 0:
            src = states_ptr + (s - 1) * state_size
        grad_src = grad_out_ptr
        if r > 0:
            grad_src = grad_states_ptr + (s % 2) * state_size
        grad_dst = grad_x_ptr
        if s > 0:
            grad_dst = grad_states_ptr + ((s - 1) % 2) * state_size
        factor_rows = (s * n_group + local)[:, None]  # the block's rows of the step's factors (int32: `factor_rows`)
        # the conditioner's hidden layers again, from the step's input: [kept, context] -> a1 -> a2, the first
        # layer's units BLOCK_HK at a time (its weights and activations in chunks, as the forward)
        inputs = tl.load(src + kept_0 + rows[:, None] * n_dim + cols_in[None, :],
                         mask=row_ok[:, None] & (cols_in[None, :] < n_kept), other=0.0)
        context_mask = row_ok[:, None] & (cols_in[None, :] >= n_kept) & in_ok[None, :]
        inputs += tl.load(context_ptr + rows[:, None] * stride_context + (cols_in - n_kept)[None, :], mask=context_mask,
                          other=0.0)
        tl.store(inputs_ptr + factor_rows * max_inputs + cols_in[None, :], inputs,
                 mask=factor_ok[:, None] & (cols_in < max_inputs)[None, :])
        a2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32) + tl.load(b2_ptr + cols_h, mask=h_ok, other=0.0)[None, :]
        for start in range(0, BLOCK_H, BLOCK_HK):
            unit = start + units
            unit_ok = unit < n_hidden
            h1 = activate(first_layer(inputs, w1_ptr, b1_ptr, unit, unit_ok, cols_in, in_ok, n_in, PRECISION), SILU,
                          APPROXIMATE)
            tl.store(h1_ptr + factor_rows * n_hidden + unit[None, :], h1, mask=factor_ok[:, None] & unit_ok[None, :])
            w2 = tl.load(w2_ptr + cols_h[None, :] * n_hidden + unit[:, None], mask=unit_ok[:, None] & h_ok[None, :],
                         other=0.0)  # (in, out)
            a2 += tl.dot(h1, w2, input_precision=PRECISION)
        h2 = activate(a2, SILU, APPROXIMATE)
        tl.store(h2_ptr + factor_rows * n_hidden + cols_h[None, :], h2, mask=h_slots)
        # the last layer and the transform, backward
        g_ladj = tl.load(grad_ladj_ptr + rows, mask=row_ok, other=0.0)
        g_raw = g_raw_ptr + factor_rows * n_outputs
        if SPLINE:
            g_h2 = _spline_last_backward(
                h2, src, grad_src, grad_dst, g_raw, column_map, rows, row_ok, factor_ok, g_ladj, w3_ptr, b3_ptr,
                changed_0, n_changed, max_changed, n_hidden, n_dim, num_bins, bound, min_width, min_height,
                min_derivative, derivative_shift, cols_h, h_ok, INVERSE, PRECISION, BLOCK_M, BLOCK_H, BLOCK_T, BLOCK_K,
                T_CHUNK)
        else:
            g_h2 = _affine_last_backward(
                h2, src, grad_src, grad_dst, g_raw, column_map, rows, row_ok, factor_ok, g_ladj, w3_ptr, b3_ptr,
                changed_0, n_changed, max_changed, n_hidden, n_dim, scale_bound, cols_h, h_ok, INVERSE, PRECISION,
                APPROXIMATE, BLOCK_OUT)
        # back through the hidden layers, the first layer's units BLOCK_HK at a time (a1 recomputed)
        g_a2 = tl.where(row_ok[:, None], g_h2 * silu_derivative(a2), 0.0)
        tl.store(g_a2_ptr + factor_rows * n_hidden + cols_h[None, :], g_a2, mask=h_slots)
        g_inputs = tl.zeros((BLOCK_M, BLOCK_IN), dtype=tl.float32)
        for start in range(0, BLOCK_H, BLOCK_HK):
            unit = start + units
            unit_ok = unit < n_hidden
            a1 = first_layer(inputs, w1_ptr, b1_ptr, unit, unit_ok, cols_in, in_ok, n_in, PRECISION)
            w2 = tl.load(w2_ptr + cols_h[:, None] * n_hidden + unit[None, :], mask=h_ok[:, None] & unit_ok[None, :],
                         other=0.0)  # (out, in)
            g_a1 = tl.where(row_ok[:, None], tl.dot(g_a2, w2, input_precision=PRECISION) * silu_derivative(a1), 0.0)
            tl.store(g_a1_ptr + factor_rows * n_hidden + unit[None, :], g_a1, mask=factor_ok[:, None] & unit_ok[None, :])
            w1 = tl.load(w1_ptr + unit[:, None] * n_in + cols_in[None, :], mask=unit_ok[:, None] & in_ok[None, :],
                         other=0.0)  # (out, in)
            g_inputs += tl.dot(g_a1, w1, input_precision=PRECISION)
        # the kept coordinates: their pass-through gradient and the conditioner's
        g_kept = g_inputs + gather_columns(grad_src, n_dim, column_map + kept_0, rows, row_ok, cols_in, n_kept)
        tl.store(grad_dst + kept_0 + rows[:, None] * n_dim + cols_in[None, :], g_kept,
                 mask=row_ok[:, None] & (cols_in[None, :] < n_kept))
        if CONTEXT_GRAD:  # summed over the steps in place (this program's rows only)
            grad_context = grad_context_ptr + rows[:, None] * n_context + (cols_in - n_kept)[None, :]
            if r > 0:
                g_inputs += tl.load(grad_context, mask=context_mask, other=0.0)
            tl.store(grad_context, g_inputs, mask=context_mask)
        tl.debug_barrier()  # this step's gradient stores are visible to every thread of the program before the next reads


def fits(n_hidden: int, max_inputs: int, max_changed: int, num_bins: int | None = None) -> bool:
    """Whether the backward takes conditioners of this width, input count (kept + context) and changed count (spline
    layers: with `num_bins`): up to `MAX_SIZES`, whose sm_90 builds stay within an H100's shared memory (227 KiB;
    Triton 3.6, tests/test_kernels_sm90.py)."""
    sizes = (n_hidden, max_inputs, max_changed, num_bins or 0)
    return all(size <= largest for size, largest in zip(sizes, MAX_SIZES))


def default_warps(spline: bool) -> int:
    """Warps per program by default: 4 for splines (64 x 8 miscompiled on an H100, see the module docstring), else 8."""
    return 4 if spline else 8


def conditioner_outputs(max_changed: int, num_bins: int | None) -> int:
    """The conditioner outputs of a layer with `max_changed` changed coordinates: 2 per coordinate (affine, without
    `num_bins`) or 3 K - 1 (spline)."""
    return max_changed * (2 if num_bins is None else 3 * num_bins - 1)


def factor_rows(n_rows: int, block_m: int, values_per_row: int, budget: int = FACTOR_BUDGET) -> tuple[int, int, int]:
    """How the backward takes n_rows: (chunk, chunks, chunks per launch). Each launch stores the factors of its
    rows (`values_per_row` each) within `budget` values (at most 2^31 - 1: the kernel's offsets into them are
    int32), and at least one block of rows; the weight gradients sum products over chunks of `chunk` rows (a
    multiple of block_m, at most about `CHUNK_ROWS`; the last chunk's rows past n_rows are zero)."""
    budget = min(budget, 2**31 - 1)
    if values_per_row * block_m > 2**31 - 1:
        raise ValueError(f"the fused coupling backward cannot store {values_per_row} factor values per row for "
                         f"{block_m} rows (int32 offsets)")
    rows_within_budget = max(block_m, budget // values_per_row // block_m * block_m)
    chunks = cdiv(n_rows, min(CHUNK_ROWS, rows_within_budget))
    chunk = block_m * cdiv(cdiv(n_rows, chunks), block_m)
    return chunk, chunks, max(1, min(chunks, budget // (values_per_row * chunk)))


def gradient_index(steps: torch.Tensor, n_params: int, *, n_context: int, n_hidden: int, max_inputs: int,
                   max_changed: int, num_bins: int | None = None) -> torch.Tensor:
    """Where each weight's gradient lies in the backward's stacked gradients (the flattened w1 `(S, H, max_inputs)`,
    b1 `(S, H)`, w2 `(S, H, H)`, b2 `(S, H)`, w3 `(S, P, H)` and b3 `(S, P)`, P = `conditioner_outputs`), as params
    lays the weights out: `(n_params,)` int64 on steps' device. steps `(S, STEP_FIELDS)` on the CPU (build once per
    run)."""
    n_steps, h = steps.shape[0], n_hidden
    n_out = conditioner_outputs(max_changed, num_bins)
    sizes = (h * max_inputs, h, h * h, h, n_out * h, n_out)  # per step, in the stacked order
    bases = torch.tensor((0,) + sizes[:-1]).cumsum(0) * n_steps
    index = torch.full((n_params,), -1, dtype=torch.int64)
    for s, (_, n_kept, _, n_changed, *offsets) in enumerate(steps.tolist()):
        n_in, p = n_kept + n_context, conditioner_outputs(n_changed, num_bins)
        shapes = ((h, n_in, max_inputs), (1, h, h), (1, h * h, h * h), (1, h, h), (p, h, h), (1, p, n_out))
        for (count, width, stride), offset, base, size in zip(shapes, offsets, bases.tolist(), sizes):
            block = base + s * size + torch.arange(count)[:, None] * stride + torch.arange(width)[None, :]
            index[offset:offset + count * width] = block.flatten()
    if (index < 0).any():
        raise ValueError("the steps' weight offsets do not cover params")
    return index


def _summed_products(g: torch.Tensor, h: torch.Tensor, chunks: int) -> torch.Tensor:
    """Σ_rows g_rᵀ h_r per step: g `(S, R, A)`, h `(S, R, B)` -> `(S, A, B)`, as one batched product per chunk of
    rows (R = chunks · chunk rows; many small products instead of S long ones) and a sum over the chunks."""
    n_steps, n_rows, a = g.shape
    products = torch.bmm(g.view(n_steps * chunks, n_rows // chunks, a).transpose(1, 2),
                         h.view(n_steps * chunks, n_rows // chunks, h.shape[2]))
    return products if chunks == 1 else products.view(n_steps, chunks, a, h.shape[2]).sum(1)


def coupling_flow_backward_triton(x, states, context, grad_out, grad_ladj, params, steps, column_maps, gradient_positions, *,
                                  n_hidden: int, max_inputs: int, max_changed: int, inverse: bool, context_grad: bool,
                                  scale_bound: float | None = None, num_bins: int | None = None,
                                  bound: float | None = None, constants: tuple[float, float, float, float] | None = None,
                                  precision: str = "ieee", approximate: bool = False, block_m: int = 64,
                                  block_hk: int = BLOCK_HK, num_warps: int | None = None, budget: int = FACTOR_BUDGET):
    """Gradients of a fused run of coupling layers (`kernels.coupling.coupling_flow_triton`): affine when
    `scale_bound` is given, else spline with `num_bins`, `bound`, `constants`.

    Arguments:
        x `(N, D)`, context `(N, C)` or None (rows any stride apart), params, steps, column_maps, n_hidden,
            max_inputs, max_changed, inverse, the layers' options, precision, approximate: as the forward launch
            took them.
        states `(S-1, N, D)`: the inputs of steps 1 … S-1 (the forward's `keep_states`).
        grad_out `(N, D)`, grad_ladj `(N,)`: the upstream gradients of the final states and the summed log|det J|.
        gradient_positions: `gradient_index(...)` of the run, on x's device.
        context_grad: also return the context's gradient.
        block_m, block_hk, num_warps: rows per program, first-layer units per chunk (a power of 2 >= 16) and warps
            (default `default_warps`); budget: float32 values of per-row factors per launch at most (`factor_rows`).
    Returns:
        the gradients w.r.t. x `(N, D)`, the context `(N, C)` (None without `context_grad`) and params (flat).
    """
    spline = scale_bound is None
    num_warps = num_warps or default_warps(spline)
    check_block_hk(block_hk)
    if not fits(n_hidden, max_inputs, max_changed, num_bins if spline else None):
        raise ValueError(f"the fused coupling backward does not fit conditioners of width {n_hidden} with {max_inputs} "
                         f"inputs and {max_changed} changed coordinates (`fits`)")
    n_rows, n_dim = x.shape
    n_steps = steps.shape[0]
    n_outputs = conditioner_outputs(max_changed, num_bins if spline else None)
    chunk, chunks, per_launch = factor_rows(n_rows, block_m, n_steps * (max_inputs + 4 * n_hidden + n_outputs), budget)
    context = x.new_empty(0, 0) if context is None else context
    grad_x = torch.empty_like(x)
    grad_states = x.new_empty(2 if n_steps > 1 else 1, n_rows, n_dim)
    grad_context = x.new_empty(n_rows, context.shape[1]) if context_grad else grad_x
    grad_out, grad_ladj = grad_out.contiguous(), grad_ladj.contiguous()
    group = per_launch * chunk
    widths = (max_inputs, n_hidden, n_hidden, n_hidden, n_hidden, n_outputs)  # inputs, h1, g_a1, h2, g_a2, g_raw
    buffers = [x.new_empty(n_steps * group * width) for width in widths]
    if spline:
        meta = spline_meta(max_inputs, n_hidden, max_changed, num_bins, inverse=inverse)
        tiles = dict(BLOCK_OUT=16, BLOCK_T=meta["BLOCK_T"], BLOCK_K=meta["BLOCK_K"], T_CHUNK=meta["T_CHUNK"])
        scalars = (0.0, float(bound), *constants)
    else:
        tiles = dict(BLOCK_OUT=dot_tile(max_changed), BLOCK_T=1, BLOCK_K=16, T_CHUNK=1)  # (the spline tiles unused)
        scalars = (float(scale_bound),) + (0.0,) * 5
    gradients = None
    for first in range(0, chunks, per_launch):
        launch_chunks = min(per_launch, chunks - first)
        n_group = launch_chunks * chunk
        inputs, h1, g_a1, h2, g_a2, g_raw = (buffer[: n_steps * n_group * width].view(n_steps, n_group, width)
                                             for buffer, width in zip(buffers, widths))
        _coupling_flow_backward_kernel[(n_group // block_m,)](
            x, states if states.numel() else x, context, grad_out, grad_ladj, grad_x, grad_states, grad_context,
            inputs, h1, g_a1, h2, g_a2, g_raw, steps, column_maps, params,
            n_rows, first * chunk, n_group, n_dim, context.shape[1], n_hidden, n_steps, max_inputs, max_changed,
            n_outputs, num_bins or 0, context.stride(0) if context.numel() else 0, *scalars,
            SPLINE=spline, CONTEXT_GRAD=context_grad, INVERSE=inverse, BLOCK_M=block_m, BLOCK_IN=dot_tile(max_inputs),
            BLOCK_H=dot_tile(n_hidden), BLOCK_HK=min(block_hk, dot_tile(n_hidden)), **tiles, PRECISION=precision,
            APPROXIMATE=approximate, FIELDS=STEP_FIELDS,
            num_warps=num_warps, num_stages=1,
        )
        parts = torch.cat([part.flatten() for part in (
            _summed_products(g_a1, inputs, launch_chunks), g_a1.sum(1), _summed_products(g_a2, h1, launch_chunks),
            g_a2.sum(1), _summed_products(g_raw, h2, launch_chunks), g_raw.sum(1))])
        gradients = parts if gradients is None else gradients + parts
    return grad_x, grad_context if context_grad else None, gradients[gradient_positions]
