"""The backward of a fused run of coupling layers (`kernels.coupling.coupling_flow_triton` with `keep_states`),
affine or spline, in one launch, for training: per block of rows and step, last to first, the conditioner is
recomputed from the step's input state, then the gradients flow back through the transform (the affine map, or the
splines T_CHUNK coordinates at a time as the forward, through `kernels.spline.rq_gradients`), the last layer and
both SiLU hidden layers to the step's input and the context, all on chip. Each program takes a fixed set of row
blocks through every step (rows are independent, so no grid-wide barrier is needed between steps) and sums the
weight gradients of its rows (in registers; the second layer's H × H one and a spline layer's last layer in its row
of `partials`, read and written per block); the programs' sums (`partials`, one row per program) add up in one
reduction afterwards, in a fixed order (deterministic). The sm_90 builds at width 128 spill ~3.6 KiB per thread
(affine, 8 warps).

On an H100 (Triton 3.6, bench/results/gpu_fused_backward_2026-11-26_NVIDIA-H100-80GB-HBM3.json): the spline kernel
at 64 rows x 8 warps read shared memory past its allocation for 4 and 16 changed coordinates (compute-sanitizer:
an illegal address; a miscompile, the interpreter's bounds are clean), so splines launch 4 warps by default
(sanitizer-clean at 1, 4 and 16 changed coordinates, as 64 x 8 with 1 and affine 64 x 8 at all three). The affine
backward took 3.7 ms at 8-D, 65,536 rows (2.7 ms with 128 rows per block), the whole training step 5.3 ms: no faster
than the layer steps (5.6 ms), so CUDA trains through them unless asked (`fastflow.ops.coupling_flow.trains_fused`).

Conditioners of width <= 128 with up to 128 inputs, 64 changed coordinates and 32 bins (`fits`: every size the
coupling layers promise, data and context dims up to 64, and beyond). Each weight tile is loaded where each product needs it
(one orientation each: TF32 products read their second operand one way only), not kept live across the block, which
took 176 KiB of shared memory at 8-D and 245 KiB with 96 inputs.
"""

import functools

import torch
import triton
import triton.language as tl

from fastflow.kernels import cdiv, dot_tile
from fastflow.kernels.activations import SILU, TANH, activate, silu_derivative
from fastflow.kernels.affine import affine_gradients, gather_columns
from fastflow.kernels.coupling import STEP_FIELDS, _spline_parameters, spline_meta, state_elements
from fastflow.kernels.spline import _rq_locate, _spline_knots, rq_gradients

__all__ = ["MAX_HIDDEN", "backward_programs", "coupling_flow_backward_triton", "default_warps", "fits"]

MAX_HIDDEN = 128
MAX_SIZES = (MAX_HIDDEN, 128, 64, 32)  # the largest width, inputs (kept + context), changed coordinates and bins
PARTIALS_BUDGET = 1 << 26  # float32 values (256 MiB) of the programs' partial weight gradients at most, by default


@triton.jit
def _so_far(ptrs, mask, accumulate):
    """The program's partial gradients at ptrs so far: zero on its first block of rows, else as stored."""
    values = tl.zeros(ptrs.shape, dtype=tl.float32)
    if accumulate:
        values = tl.load(ptrs, mask=mask, other=0.0)
    return values


@triton.jit
def _affine_last_backward(h2, src, grad_src, grad_dst, column_map, rows, row_ok, g_ladj, w3_ptr, b3_ptr, changed_0,
                          n_changed, n_hidden, n_dim, scale_bound, cols_h, h_ok, grad_w_scale, grad_w_shift, grad_b_scale,
                          grad_b_shift, INVERSE: tl.constexpr, PRECISION: tl.constexpr, APPROXIMATE: tl.constexpr,
                          BLOCK_OUT: tl.constexpr):
    """An affine layer's last conditioner layer and map on a block of rows, backward: stores the changed
    coordinates' gradients, adds the last layer's weight gradients to the accumulators; returns the gradient of the
    last hidden activations h2 `(BLOCK_M, BLOCK_H)` and the accumulators."""
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
    grad_w_scale += tl.dot(tl.trans(g_raw_scale), h2, input_precision=PRECISION)
    grad_w_shift += tl.dot(tl.trans(g_shift), h2, input_precision=PRECISION)
    grad_b_scale += tl.sum(g_raw_scale, axis=0)
    grad_b_shift += tl.sum(g_shift, axis=0)
    # (the last layer's rows again, (out, in) as the products back to h2 read them)
    w3_mask = out_ok[:, None] & h_ok[None, :]
    w_scale = tl.load(w3_ptr + (2 * cols_out)[:, None] * n_hidden + cols_h[None, :], mask=w3_mask, other=0.0)
    w_shift = tl.load(w3_ptr + (2 * cols_out + 1)[:, None] * n_hidden + cols_h[None, :], mask=w3_mask, other=0.0)
    g_h2 = (tl.dot(g_raw_scale, w_scale, input_precision=PRECISION)
            + tl.dot(g_shift, w_shift, input_precision=PRECISION))
    return g_h2, grad_w_scale, grad_w_shift, grad_b_scale, grad_b_shift


@triton.jit
def _add_output_gradients(g_params, h2, w3_ptr, grad_w3_ptr, grad_b3_ptr, parameter_rows, ok, accumulate, n_hidden,
                          cols_h, h_ok, PRECISION: tl.constexpr):
    """For the gradients g_params `(BLOCK_M, P)` of the conditioner outputs `parameter_rows (P,)`: adds their weight
    and bias gradients to the program's partials (rows of w3 `(·, H)` and b3), returns their part of h2's gradient."""
    mask = ok[:, None] & h_ok[None, :]
    offsets = parameter_rows[:, None] * n_hidden + cols_h[None, :]
    tl.store(grad_w3_ptr + offsets, tl.dot(tl.trans(g_params), h2, _so_far(grad_w3_ptr + offsets, mask, accumulate),
                                           input_precision=PRECISION), mask=mask)
    tl.store(grad_b3_ptr + parameter_rows,
             tl.sum(g_params, axis=0) + _so_far(grad_b3_ptr + parameter_rows, ok, accumulate), mask=ok)
    weights = tl.load(w3_ptr + offsets, mask=mask, other=0.0)
    return tl.dot(g_params, weights, input_precision=PRECISION)


@triton.jit
def _spline_last_backward(h2, src, grad_src, grad_dst, column_map, rows, row_ok, g_ladj, w3_ptr, b3_ptr, grad_w3_ptr,
                          grad_b3_ptr, accumulate, changed_0, n_changed, n_hidden, n_dim, num_bins, bound, min_width,
                          min_height, min_derivative, derivative_shift, cols_h, h_ok, INVERSE: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_K: tl.constexpr, T_CHUNK: tl.constexpr):
    """A spline layer's last conditioner layer and splines on a block of rows, backward, T_CHUNK coordinates at a
    time as the forward (`kernels.coupling._spline_layer`): stores the changed coordinates' gradients, adds the last
    layer's weight gradients to the program's partials; returns the gradient of h2 `(BLOCK_M, BLOCK_H)`."""
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
        g_h2 += _add_output_gradients(tl.reshape(g_width, (BLOCK_M, T_CHUNK * BLOCK_K)), h2, w3_ptr, grad_w3_ptr,
                                      grad_b3_ptr, first + k, in_bins, accumulate, n_hidden, cols_h, h_ok, PRECISION)
        g_h2 += _add_output_gradients(tl.reshape(g_height, (BLOCK_M, T_CHUNK * BLOCK_K)), h2, w3_ptr, grad_w3_ptr,
                                      grad_b3_ptr, first + num_bins + k, in_bins, accumulate, n_hidden, cols_h, h_ok,
                                      PRECISION)
        g_h2 += _add_output_gradients(tl.reshape(g_derivative, (BLOCK_M, T_CHUNK * BLOCK_K)), h2, w3_ptr, grad_w3_ptr,
                                      grad_b3_ptr, first + 2 * num_bins + k, derivative_ok, accumulate, n_hidden, cols_h,
                                      h_ok, PRECISION)
    return g_h2


@triton.jit
def _coupling_flow_backward_kernel(
    # pointers
    x_ptr, states_ptr, context_ptr, grad_out_ptr, grad_ladj_ptr, grad_x_ptr, grad_states_ptr, grad_context_ptr,
    partials_ptr, steps_ptr, column_maps_ptr, params_ptr,
    # dimensions
    n_rows, n_dim, n_context, n_hidden, n_steps, n_params, num_bins, stride_context,
    # scalars: the affine layers' scale bound, the spline layers' bound and constants
    scale_bound, bound, min_width, min_height, min_derivative, derivative_shift,
    # meta-parameters
    SPLINE: tl.constexpr, CONTEXT_GRAD: tl.constexpr, INVERSE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_IN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, T_CHUNK: tl.constexpr, PRECISION: tl.constexpr, APPROXIMATE: tl.constexpr,
    FIELDS: tl.constexpr,
):
    """Gradients of Σ grad_out·out + grad_ladj·ladj of the run w.r.t. x, the context and every weight. Step s's
    input is x (s = 0) or states[s - 1]; the gradient of step s's output is grad_out (last step) or a slot of
    grad_states `(2, N, D)` that step s + 1 wrote; the program's weight gradients of step s go to its row of
    partials `(programs, n_params)` at the weights' offsets in params."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    n_blocks = tl.cdiv(n_rows, BLOCK_M)
    state_size = state_elements(n_rows, n_dim)
    partial = partials_ptr + program.to(tl.int64) * n_params
    cols_in = tl.arange(0, BLOCK_IN)
    cols_h = tl.arange(0, BLOCK_H)
    cols_out = tl.arange(0, BLOCK_OUT)
    h_ok = cols_h < n_hidden
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
        grad_w2_ptr = partial + tl.load(step + 6) + cols_h[:, None] * n_hidden + cols_h[None, :]
        grad_w2_mask = h_ok[:, None] & h_ok[None, :]
        grad_w1 = tl.zeros((BLOCK_H, BLOCK_IN), dtype=tl.float32)
        grad_b1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
        grad_b2 = tl.zeros((BLOCK_H,), dtype=tl.float32)
        grad_w_scale = tl.zeros((BLOCK_OUT, BLOCK_H), dtype=tl.float32)  # (affine layers)
        grad_w_shift = tl.zeros((BLOCK_OUT, BLOCK_H), dtype=tl.float32)
        grad_b_scale = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
        grad_b_shift = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
        for block in range(program, n_blocks, programs):
            rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: N·D may pass 2^31
            row_ok = rows < n_rows
            accumulate = block != program  # (partials: the program's first block writes them)
            # the conditioner's hidden layers again, from the step's input: [kept, context] -> a1 -> a2
            inputs = tl.load(src + kept_0 + rows[:, None] * n_dim + cols_in[None, :],
                             mask=row_ok[:, None] & (cols_in[None, :] < n_kept), other=0.0)
            context_mask = row_ok[:, None] & (cols_in[None, :] >= n_kept) & in_ok[None, :]
            inputs += tl.load(context_ptr + rows[:, None] * stride_context + (cols_in - n_kept)[None, :], mask=context_mask,
                              other=0.0)
            w1 = tl.load(w1_ptr + cols_h[:, None] * n_in + cols_in[None, :], mask=h_ok[:, None] & in_ok[None, :], other=0.0)
            a1 = tl.dot(inputs, tl.trans(w1), input_precision=PRECISION) + tl.load(b1_ptr + cols_h, mask=h_ok, other=0.0)[None, :]
            h1 = activate(a1, SILU, APPROXIMATE)
            w2 = tl.load(w2_ptr + cols_h[:, None] * n_hidden + cols_h[None, :], mask=grad_w2_mask, other=0.0)  # (out, in)
            a2 = tl.dot(h1, tl.trans(w2), input_precision=PRECISION) + tl.load(b2_ptr + cols_h, mask=h_ok, other=0.0)[None, :]
            h2 = activate(a2, SILU, APPROXIMATE)
            # the last layer and the transform, backward
            g_ladj = tl.load(grad_ladj_ptr + rows, mask=row_ok, other=0.0)
            if SPLINE:
                g_h2 = _spline_last_backward(
                    h2, src, grad_src, grad_dst, column_map, rows, row_ok, g_ladj, w3_ptr, b3_ptr, partial + tl.load(step + 8),
                    partial + tl.load(step + 9), accumulate, changed_0, n_changed, n_hidden, n_dim, num_bins, bound,
                    min_width, min_height, min_derivative, derivative_shift, cols_h, h_ok, INVERSE, PRECISION, BLOCK_M,
                    BLOCK_H, BLOCK_T, BLOCK_K, T_CHUNK)
            else:
                g_h2, grad_w_scale, grad_w_shift, grad_b_scale, grad_b_shift = _affine_last_backward(
                    h2, src, grad_src, grad_dst, column_map, rows, row_ok, g_ladj, w3_ptr, b3_ptr, changed_0, n_changed,
                    n_hidden, n_dim, scale_bound, cols_h, h_ok, grad_w_scale, grad_w_shift, grad_b_scale, grad_b_shift,
                    INVERSE, PRECISION, APPROXIMATE, BLOCK_OUT)
            # back through the hidden layers (the H x H gradient accumulates in the program's row of partials: in
            # registers it would spill)
            g_a2 = g_h2 * silu_derivative(a2)
            tl.store(grad_w2_ptr, tl.dot(tl.trans(g_a2), h1, _so_far(grad_w2_ptr, grad_w2_mask, accumulate),
                                         input_precision=PRECISION), mask=grad_w2_mask)
            grad_b2 += tl.sum(g_a2, axis=0)
            w2 = tl.load(w2_ptr + cols_h[:, None] * n_hidden + cols_h[None, :], mask=grad_w2_mask, other=0.0)
            g_a1 = tl.dot(g_a2, w2, input_precision=PRECISION) * silu_derivative(a1)
            grad_w1 += tl.dot(tl.trans(g_a1), inputs, input_precision=PRECISION)
            grad_b1 += tl.sum(g_a1, axis=0)
            w1 = tl.load(w1_ptr + cols_h[:, None] * n_in + cols_in[None, :], mask=h_ok[:, None] & in_ok[None, :], other=0.0)
            g_inputs = tl.dot(g_a1, w1, input_precision=PRECISION)
            # the kept coordinates: their pass-through gradient and the conditioner's
            g_kept = g_inputs + gather_columns(grad_src, n_dim, column_map + kept_0, rows, row_ok, cols_in, n_kept)
            tl.store(grad_dst + kept_0 + rows[:, None] * n_dim + cols_in[None, :], g_kept,
                     mask=row_ok[:, None] & (cols_in[None, :] < n_kept))
            if CONTEXT_GRAD:  # summed over the steps in place (this program's rows only)
                grad_context = grad_context_ptr + rows[:, None] * n_context + (cols_in - n_kept)[None, :]
                if r > 0:
                    g_inputs += tl.load(grad_context, mask=context_mask, other=0.0)
                tl.store(grad_context, g_inputs, mask=context_mask)
            tl.debug_barrier()  # the partials' read-modify-writes in order from block to block
        # this program's weight gradients of the step, as params lays the weights out
        tl.store(partial + tl.load(step + 4) + cols_h[:, None] * n_in + cols_in[None, :], grad_w1, mask=h_ok[:, None] & in_ok[None, :])
        tl.store(partial + tl.load(step + 5) + cols_h, grad_b1, mask=h_ok)
        tl.store(partial + tl.load(step + 7) + cols_h, grad_b2, mask=h_ok)
        if not SPLINE:
            out_ok = cols_out < n_changed
            w3_offsets = partial + tl.load(step + 8) + (2 * cols_out)[:, None] * n_hidden + cols_h[None, :]
            tl.store(w3_offsets, grad_w_scale, mask=out_ok[:, None] & h_ok[None, :])
            tl.store(w3_offsets + n_hidden, grad_w_shift, mask=out_ok[:, None] & h_ok[None, :])
            tl.store(partial + tl.load(step + 9) + 2 * cols_out, grad_b_scale, mask=out_ok)
            tl.store(partial + tl.load(step + 9) + 2 * cols_out + 1, grad_b_shift, mask=out_ok)
        tl.debug_barrier()  # this step's gradient stores are visible to every thread of the program before the next reads


def fits(n_hidden: int, max_inputs: int, max_changed: int, num_bins: int | None = None) -> bool:
    """Whether the backward takes conditioners of this width, input count (kept + context) and changed count (spline
    layers: with `num_bins`): up to `MAX_SIZES`, whose sm_90 builds stay within an H100's shared memory (227 KiB;
    Triton 3.6, width 128: 164 KiB affine, 192 KiB spline at the largest sizes, tests/test_kernels_sm90.py)."""
    sizes = (n_hidden, max_inputs, max_changed, num_bins or 0)
    return all(size <= largest for size, largest in zip(sizes, MAX_SIZES))


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_warps(spline: bool) -> int:
    """Warps per program by default: 4 for splines (64 x 8 miscompiled on an H100, see the module docstring), else 8."""
    return 4 if spline else 8


def backward_programs(n_rows: int, block_m: int, device: torch.device, n_params: int, programs: int | None = None) -> int:
    """Programs of the backward launch: `programs`, by default one per multiprocessor on CUDA and 4
    elsewhere (the interpreter), fewer where their partial sums (`n_params` each) would pass `PARTIALS_BUDGET`
    values, and at most one per block of rows."""
    default = min(_multiprocessors(device) if device.type == "cuda" else 4, PARTIALS_BUDGET // max(n_params, 1))
    return max(1, min(cdiv(n_rows, block_m), programs or default))


def coupling_flow_backward_triton(x, states, context, grad_out, grad_ladj, params, steps, column_maps, *, n_hidden: int,
                                  max_inputs: int, max_changed: int, inverse: bool, context_grad: bool,
                                  scale_bound: float | None = None, num_bins: int | None = None,
                                  bound: float | None = None, constants: tuple[float, float, float, float] | None = None,
                                  precision: str = "ieee", approximate: bool = False, block_m: int = 64,
                                  num_warps: int | None = None, programs: int | None = None):
    """Gradients of a fused run of coupling layers (`kernels.coupling.coupling_flow_triton`): affine when
    `scale_bound` is given, else spline with `num_bins`, `bound`, `constants`.

    Arguments:
        x `(N, D)`, context `(N, C)` or None (rows any stride apart), params, steps, column_maps, n_hidden,
            max_inputs, max_changed, inverse, the layers' options, precision, approximate: as the forward launch
            took them.
        states `(S-1, N, D)`: the inputs of steps 1 … S-1 (the forward's `keep_states`).
        grad_out `(N, D)`, grad_ladj `(N,)`: the upstream gradients of the final states and the summed log|det J|.
        context_grad: also return the context's gradient.
        block_m, num_warps, programs: rows per block, warps per program (default `default_warps`) and programs
            (default: `backward_programs`).
    Returns:
        the gradients w.r.t. x `(N, D)`, the context `(N, C)` (None without `context_grad`) and params (flat).
    """
    spline = scale_bound is None
    num_warps = num_warps or default_warps(spline)
    if not fits(n_hidden, max_inputs, max_changed, num_bins if spline else None):
        raise ValueError(f"the fused coupling backward does not fit conditioners of width {n_hidden} with {max_inputs} "
                         f"inputs and {max_changed} changed coordinates (`fits`)")
    n_rows, n_dim = x.shape
    n_steps = steps.shape[0]
    programs = backward_programs(n_rows, block_m, x.device, params.numel(), programs)
    context = x.new_empty(0, 0) if context is None else context
    grad_x = torch.empty_like(x)
    grad_states = x.new_empty(2 if n_steps > 1 else 1, n_rows, n_dim)
    grad_context = x.new_empty(n_rows, context.shape[1]) if context_grad else grad_x
    partials = x.new_empty(programs, params.numel())
    if spline:
        meta = spline_meta(max_inputs, n_hidden, max_changed, num_bins, inverse=inverse)
        tiles = dict(BLOCK_OUT=16, BLOCK_T=meta["BLOCK_T"], BLOCK_K=meta["BLOCK_K"], T_CHUNK=meta["T_CHUNK"])
        scalars = (0.0, float(bound), *constants)
    else:
        tiles = dict(BLOCK_OUT=dot_tile(max_changed), BLOCK_T=1, BLOCK_K=16, T_CHUNK=1)  # (the spline tiles unused)
        scalars = (float(scale_bound),) + (0.0,) * 5
    _coupling_flow_backward_kernel[(programs,)](
        x, states if states.numel() else x, context, grad_out.contiguous(), grad_ladj.contiguous(), grad_x, grad_states,
        grad_context, partials, steps, column_maps, params,
        n_rows, n_dim, context.shape[1], n_hidden, n_steps, params.numel(), num_bins or 0,
        context.stride(0) if context.numel() else 0, *scalars,
        SPLINE=spline, CONTEXT_GRAD=context_grad, INVERSE=inverse, BLOCK_M=block_m, BLOCK_IN=dot_tile(max_inputs),
        BLOCK_H=dot_tile(n_hidden), **tiles, PRECISION=precision, APPROXIMATE=approximate, FIELDS=STEP_FIELDS,
        num_warps=num_warps, num_stages=1,
    )
    return grad_x, grad_context if context_grad else None, partials.sum(0)
