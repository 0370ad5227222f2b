"""The backward of a fused run of affine coupling layers (`kernels.coupling.coupling_flow_triton` with
`keep_states`) in one launch, for training: per block of rows and step, last to first, the conditioner is
recomputed from the step's input state, then the gradients flow back through the map, the last layer and both
SiLU hidden layers to the step's input and the context, all on chip. Each program takes a fixed set of row blocks
through every step (rows are independent, so no grid-wide barrier is needed between steps) and sums the weight
gradients of its rows (in registers; the H × H one of the second layer in its row of `partials`, read and written
per block); the programs' sums (`partials`, one row per program) add up in one reduction afterwards, in a fixed
order (deterministic). The sm_90 builds at width 128 spill ~3.6 KiB per thread (8 warps; not yet timed).

Conditioners of width <= `MAX_HIDDEN` whose weight tiles fit shared memory (`fits`: at width 128, every size the
coupling layers promise, data and context dims up to 64). Each weight tile is loaded where each product needs it
(one orientation each: TF32 products read their second operand one way only), not kept live across the block, which
took 176 KiB of shared memory at 8-D and 245 KiB with 96 inputs.
"""

import functools

import torch
import triton
import triton.language as tl

from fastflow.kernels import cdiv, dot_tile
from fastflow.kernels.activations import SILU, TANH, activate
from fastflow.kernels.affine import affine_gradients, gather_columns
from fastflow.kernels.coupling import STEP_FIELDS

__all__ = ["MAX_HIDDEN", "affine_flow_backward_triton", "backward_programs", "fits"]

MAX_HIDDEN = 128
H100_SHARED_MEMORY = 227 * 1024  # bytes per block (opt-in maximum)


@triton.jit
def _silu_derivative(a):
    sigmoid = 1.0 / (1.0 + tl.exp(-a))
    return sigmoid * (1.0 + a * (1.0 - sigmoid))


@triton.jit
def _affine_flow_backward_kernel(
    # pointers
    x_ptr, states_ptr, context_ptr, grad_out_ptr, grad_ladj_ptr, grad_x_ptr, grad_states_ptr, grad_context_ptr,
    partials_ptr, steps_ptr, column_maps_ptr, params_ptr,
    # dimensions
    n_rows, n_dim, n_context, n_hidden, n_steps, n_params, stride_context,
    # scalars
    scale_bound,
    # meta-parameters
    CONTEXT_GRAD: tl.constexpr, INVERSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_IN: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_OUT: tl.constexpr, PRECISION: tl.constexpr, APPROXIMATE: tl.constexpr,
    FIELDS: tl.constexpr,
):
    """Gradients of Σ grad_out·out + grad_ladj·ladj of the run w.r.t. x, the context and every weight. Step s's
    input is x (s = 0) or states[s - 1]; the gradient of step s's output is grad_out (last step) or a slot of
    grad_states `(2, N, D)` that step s + 1 wrote; the program's weight gradients of step s go to its row of
    partials `(programs, n_params)` at the weights' offsets in params."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    n_blocks = tl.cdiv(n_rows, BLOCK_M)
    state_size = (program.to(tl.int64) * 0 + n_rows) * n_dim  # int64 (a state's elements may pass 2^31)
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
        out_ok = cols_out < n_changed
        src = x_ptr
        if s > 0:
            src = states_ptr + (s - 1) * state_size
        grad_src = grad_out_ptr
        if r > 0:
            grad_src = grad_states_ptr + (s % 2) * state_size
        grad_w2_ptr = partial + tl.load(step + 6) + cols_h[:, None] * n_hidden + cols_h[None, :]
        grad_w2_mask = h_ok[:, None] & h_ok[None, :]
        grad_dst = grad_x_ptr
        if s > 0:
            grad_dst = grad_states_ptr + ((s - 1) % 2) * state_size
        grad_w1 = tl.zeros((BLOCK_H, BLOCK_IN), dtype=tl.float32)
        grad_w_scale = tl.zeros((BLOCK_OUT, BLOCK_H), dtype=tl.float32)
        grad_w_shift = tl.zeros((BLOCK_OUT, BLOCK_H), dtype=tl.float32)
        grad_b1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
        grad_b2 = tl.zeros((BLOCK_H,), dtype=tl.float32)
        grad_b_scale = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
        grad_b_shift = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
        for block in range(program, n_blocks, programs):
            rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: N·D may pass 2^31
            row_ok = rows < n_rows
            # the conditioner again, from the step's input: [kept, context] -> a1 -> a2 -> (raw log-scale, shift)
            inputs = tl.load(src + kept_0 + rows[:, None] * n_dim + cols_in[None, :],
                             mask=row_ok[:, None] & (cols_in[None, :] < n_kept), other=0.0)
            context_mask = row_ok[:, None] & (cols_in[None, :] >= n_kept) & in_ok[None, :]
            inputs += tl.load(context_ptr + rows[:, None] * stride_context + (cols_in - n_kept)[None, :], mask=context_mask,
                              other=0.0)
            w1 = tl.load(w1_ptr + cols_h[:, None] * n_in + cols_in[None, :], mask=h_ok[:, None] & in_ok[None, :], other=0.0)
            a1 = tl.dot(inputs, tl.trans(w1), input_precision=PRECISION) + tl.load(b1_ptr + cols_h, mask=h_ok, other=0.0)[None, :]
            h1 = activate(a1, SILU, APPROXIMATE)
            w2 = tl.load(w2_ptr + cols_h[:, None] * n_hidden + cols_h[None, :], mask=h_ok[:, None] & h_ok[None, :],
                         other=0.0)  # (out, in), as stored
            a2 = tl.dot(h1, tl.trans(w2), input_precision=PRECISION) + tl.load(b2_ptr + cols_h, mask=h_ok, other=0.0)[None, :]
            h2 = activate(a2, SILU, APPROXIMATE)
            w3_mask = h_ok[:, None] & out_ok[None, :]
            w_scale = tl.load(w3_ptr + (2 * cols_out)[None, :] * n_hidden + cols_h[:, None], mask=w3_mask, other=0.0)
            w_shift = tl.load(w3_ptr + (2 * cols_out + 1)[None, :] * n_hidden + cols_h[:, None], mask=w3_mask, other=0.0)
            raw_scale = (tl.dot(h2, w_scale, input_precision=PRECISION)
                         + tl.load(b3_ptr + 2 * cols_out, mask=out_ok, other=0.0)[None, :])
            shift = (tl.dot(h2, w_shift, input_precision=PRECISION)
                     + tl.load(b3_ptr + 2 * cols_out + 1, mask=out_ok, other=0.0)[None, :])
            # the map's gradients, then back through the last layer and the hidden layers
            changed_mask = row_ok[:, None] & out_ok[None, :]
            x = tl.load(src + changed_0 + rows[:, None] * n_dim + cols_out[None, :], mask=changed_mask, other=0.0)
            squashed = activate(raw_scale / scale_bound, TANH, APPROXIMATE)
            g_out = gather_columns(grad_src, n_dim, column_map + changed_0, rows, row_ok, cols_out, n_changed)
            g_ladj = tl.load(grad_ladj_ptr + rows, mask=row_ok, other=0.0)[:, None]
            g_x, g_shift, g_raw_scale = affine_gradients(x, shift, scale_bound * squashed, squashed, g_out, g_ladj, INVERSE)
            g_shift = tl.where(changed_mask, g_shift, 0.0)
            g_raw_scale = tl.where(changed_mask, g_raw_scale, 0.0)
            tl.store(grad_dst + changed_0 + rows[:, None] * n_dim + cols_out[None, :], g_x, mask=changed_mask)
            grad_w_scale += tl.dot(tl.trans(g_raw_scale), h2, input_precision=PRECISION)
            grad_w_shift += tl.dot(tl.trans(g_shift), h2, input_precision=PRECISION)
            grad_b_scale += tl.sum(g_raw_scale, axis=0)
            grad_b_shift += tl.sum(g_shift, axis=0)
            w_scale = tl.load(w3_ptr + (2 * cols_out)[:, None] * n_hidden + cols_h[None, :], mask=out_ok[:, None] & h_ok[None, :], other=0.0)
            w_shift = tl.load(w3_ptr + (2 * cols_out + 1)[:, None] * n_hidden + cols_h[None, :], mask=out_ok[:, None] & h_ok[None, :], other=0.0)
            g_a2 = (tl.dot(g_raw_scale, w_scale, input_precision=PRECISION)
                    + tl.dot(g_shift, w_shift, input_precision=PRECISION)) * _silu_derivative(a2)
            # (the H x H gradient accumulates in the program's row of partials: in registers it would spill)
            grad_w2 = tl.zeros((BLOCK_H, BLOCK_H), dtype=tl.float32)
            if block != program:
                grad_w2 = tl.load(grad_w2_ptr, mask=grad_w2_mask, other=0.0)
            tl.store(grad_w2_ptr, tl.dot(tl.trans(g_a2), h1, grad_w2, input_precision=PRECISION), mask=grad_w2_mask)
            grad_b2 += tl.sum(g_a2, axis=0)
            w2 = tl.load(w2_ptr + cols_h[:, None] * n_hidden + cols_h[None, :], mask=h_ok[:, None] & h_ok[None, :], other=0.0)
            g_a1 = tl.dot(g_a2, w2, input_precision=PRECISION) * _silu_derivative(a1)
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
        # this program's weight gradients of the step, as params lays the weights out
        tl.store(partial + tl.load(step + 4) + cols_h[:, None] * n_in + cols_in[None, :], grad_w1, mask=h_ok[:, None] & in_ok[None, :])
        tl.store(partial + tl.load(step + 5) + cols_h, grad_b1, mask=h_ok)
        tl.store(partial + tl.load(step + 7) + cols_h, grad_b2, mask=h_ok)
        w3_offsets = partial + tl.load(step + 8) + (2 * cols_out)[:, None] * n_hidden + cols_h[None, :]
        tl.store(w3_offsets, grad_w_scale, mask=out_ok[:, None] & h_ok[None, :])
        tl.store(w3_offsets + n_hidden, grad_w_shift, mask=out_ok[:, None] & h_ok[None, :])
        tl.store(partial + tl.load(step + 9) + 2 * cols_out, grad_b_scale, mask=out_ok)
        tl.store(partial + tl.load(step + 9) + 2 * cols_out + 1, grad_b_shift, mask=out_ok)
        tl.debug_barrier()  # this step's gradient stores are visible to every thread of the program before the next reads


def fits(n_hidden: int, max_inputs: int, max_changed: int) -> bool:
    """Whether the backward takes conditioners of this width, input count (kept + context) and changed count: width
    <= `MAX_HIDDEN` and the weight tiles within an H100's shared memory (227 KiB). The estimate, one copy of every
    tile, bounds the sm_90 builds (Triton 3.6 and 3.9, width 128: 104 KiB at 32 inputs and 32 changed coordinates,
    128 KiB at 128 and 32)."""
    tiles = dot_tile(n_hidden) * (dot_tile(max_inputs) + dot_tile(n_hidden) + 2 * dot_tile(max_changed))
    return n_hidden <= MAX_HIDDEN and 4 * tiles <= H100_SHARED_MEMORY


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def backward_programs(n_rows: int, block_m: int, device: torch.device, programs: int | None = None) -> int:
    """Programs of the backward launch: `programs`, by default one per multiprocessor on CUDA (each holds the weight
    gradients in registers at 8 warps) and 4 elsewhere (the interpreter), at most one per block of rows."""
    default = _multiprocessors(device) if device.type == "cuda" else 4
    return max(1, min(cdiv(n_rows, block_m), programs or default))


def affine_flow_backward_triton(x, states, context, grad_out, grad_ladj, params, steps, column_maps, *, n_hidden: int,
                                max_inputs: int, max_changed: int, scale_bound: float, inverse: bool,
                                context_grad: bool, precision: str = "ieee", approximate: bool = False,
                                block_m: int = 64, num_warps: int = 8, programs: int | None = None):
    """Gradients of a fused run of affine coupling layers (`kernels.coupling.coupling_flow_triton`).

    Arguments:
        x `(N, D)`, context `(N, C)` or None (rows any stride apart), params, steps, column_maps, n_hidden,
            max_inputs, max_changed, scale_bound, inverse, precision, approximate: as the forward launch took them.
        states `(S-1, N, D)`: the inputs of steps 1 … S-1 (the forward's `keep_states`).
        grad_out `(N, D)`, grad_ladj `(N,)`: the upstream gradients of the final states and the summed log|det J|.
        context_grad: also return the context's gradient.
        block_m, num_warps, programs: rows per block, warps per program and programs (`backward_programs`).
    Returns:
        the gradients w.r.t. x `(N, D)`, the context `(N, C)` (None without `context_grad`) and params (flat).
    """
    if not fits(n_hidden, max_inputs, max_changed):
        raise ValueError(f"the fused affine backward does not fit conditioners of width {n_hidden} with {max_inputs} "
                         f"inputs and {max_changed} outputs pairs (`fits`)")
    n_rows, n_dim = x.shape
    n_steps = steps.shape[0]
    programs = backward_programs(n_rows, block_m, x.device, programs)
    context = x.new_empty(0, 0) if context is None else context
    grad_x = torch.empty_like(x)
    grad_states = x.new_empty(2 if n_steps > 1 else 1, n_rows, n_dim)
    grad_context = x.new_empty(n_rows, context.shape[1]) if context_grad else grad_x
    partials = x.new_empty(programs, params.numel())
    _affine_flow_backward_kernel[(programs,)](
        x, states if states.numel() else x, context, grad_out.contiguous(), grad_ladj.contiguous(), grad_x, grad_states,
        grad_context, partials, steps, column_maps, params,
        n_rows, n_dim, context.shape[1], n_hidden, n_steps, params.numel(), context.stride(0) if context.numel() else 0,
        float(scale_bound),
        CONTEXT_GRAD=context_grad, INVERSE=inverse, BLOCK_M=block_m, BLOCK_IN=dot_tile(max_inputs),
        BLOCK_H=dot_tile(n_hidden), BLOCK_OUT=dot_tile(max_changed), PRECISION=precision, APPROXIMATE=approximate,
        FIELDS=STEP_FIELDS, num_warps=num_warps, num_stages=1,
    )
    return grad_x, grad_context if context_grad else None, partials.sum(0)
