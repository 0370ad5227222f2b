"""Fused fixed-step ODE integration of an MLP velocity field in Triton: per tile of BLOCK_M samples, every
step of the grid and every Runge–Kutta stage (Euler, midpoint, Heun, RK4: up to 4 stages, unrolled from
constexpr Butcher coefficients) runs in one launch, with the state and the hidden activations on chip (wide
layers pass through a cache-resident scratch tile). With `block_n` below the padded width, each layer is computed
block_n outputs at a time between two scratch tiles (`_velocity_streamed`), which keeps width-256 fields free of
register spills on sm_90 (bench/sm90.py; not yet timed, so not the default).

The velocity is `fastflow.fm.VelocityMLP` with equal hidden widths, split on the host into
    z_1 = act(W_x x + time_bias[evaluation] + context_bias[sample]),
    z_{l+1} = act(W_l z_l + b_l) (+ z_l when residual),   v = W_out z_L + b_out,
where the first layer's time and context columns are precomputed once per call (`fastflow.fm.fused`).
Forward only; `fastflow.fm.fused.mlp_odeint` is the dispatch and `fastflow.fm.odeint` the reference.

With `bf16` the hidden layers multiply bfloat16 operands (`_hidden_input`, `_hidden_dot`: weights cast once per call,
each hidden input rounded, float32 sums; scratch tiles in bfloat16), which halves the weights' and scratch tiles' bytes
and doubles the tensor cores' rate against TF32; its reference is `fastflow.fm.fused.bf16_hidden_field`. sm_90 builds
(Triton 3.6 and 3.9, bench/sm90.py) compile without spills at width 64 (one chunk, 190-198 registers) and width 256
streamed (block_n 64, block_k 32; 128 rows without a per-sample context, 64 with one; block_n 32 at 64 rows takes
127-198 registers); not yet timed on a GPU, so it runs the float32 mode's launch defaults.
"""

import torch
import triton
import triton.language as tl

from fastflow.kernels import cdiv, dot_tile
from fastflow.kernels.activations import ACTIVATION_IDS, activate, approximate_activations

__all__ = ["ACTIVATION_IDS", "MAX_HIDDEN", "MAX_LAYERS", "MAX_STAGES", "MAX_STATE_DIM", "mlp_odeint_triton"]

MAX_HIDDEN, MAX_LAYERS, MAX_STAGES, MAX_STATE_DIM = 256, 4, 4, 256


@triton.jit
def _load_transposed(w_ptr, row_0, n_rows, n_cols, rows, cols):
    """Rows [row_0, row_0 + len(rows)) of Wᵀ for W `(n_cols, n_rows)` row-major (out, in): an (in, out) tile."""
    mask = (row_0 + rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(w_ptr + cols[None, :] * n_rows + (row_0 + rows)[:, None], mask=mask, other=0.0)


@triton.jit
def _hidden_input(z, HIDDEN_OPERANDS: tl.constexpr):
    """A hidden layer's input as its product (and its residual) takes it: z itself (HIDDEN_OPERANDS 0), z rounded
    to bfloat16 (1), or, under the interpreter (whose bfloat16 products are wrong), float32 z rounded to bfloat16's
    nearest even by its bits (2)."""
    if HIDDEN_OPERANDS == 1:
        out = z.to(tl.bfloat16)
    elif HIDDEN_OPERANDS == 2:
        bits = z.to(tl.uint32, bitcast=True)
        out = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        out = z
    return out


@triton.jit
def _hidden_dot(z, w, PRECISION: tl.constexpr, HIDDEN_OPERANDS: tl.constexpr):
    """z @ w for a hidden layer's input z (`_hidden_input`) and weight tile w: products per PRECISION
    (HIDDEN_OPERANDS 0), on bfloat16 operands (1), or on float32 operands holding bfloat16 values (2); float32 sums."""
    if HIDDEN_OPERANDS == 0:
        out = tl.dot(z, w, input_precision=PRECISION)
    elif HIDDEN_OPERANDS == 1:
        out = tl.dot(z, w)
    else:
        out = tl.dot(z, w, input_precision="ieee")
    return out


@triton.jit
def _hidden_matmul(z, w_ptr, scratch_ptr, n_hidden, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr, HIDDEN_OPERANDS: tl.constexpr, K_STAGES: tl.constexpr):
    """z `(BLOCK_M, BLOCK_H)` (`_hidden_input`) @ Wᵀ for W `(H, H)`. When BLOCK_K < BLOCK_H, z goes through this
    program's scratch tile `(BLOCK_M, BLOCK_H)` (global memory, cache-resident) and the product is summed over
    BLOCK_K-wide chunks in a loop, so that a weight tile holds BLOCK_K × BLOCK_H values."""
    cols = tl.arange(0, BLOCK_H)
    if BLOCK_K == BLOCK_H:
        out = _hidden_dot(z, _load_transposed(w_ptr, 0, n_hidden, n_hidden, cols, cols), PRECISION, HIDDEN_OPERANDS)
    else:
        rows = tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        tl.debug_barrier()  # every thread has read the previous layer's tile
        tl.store(scratch_ptr + rows[:, None] * BLOCK_H + cols[None, :], z)
        tl.debug_barrier()
        out = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        for k_0 in tl.range(0, BLOCK_H, BLOCK_K, num_stages=K_STAGES):
            z_k = tl.load(scratch_ptr + rows[:, None] * BLOCK_H + (k_0 + ks)[None, :])
            out += _hidden_dot(z_k, _load_transposed(w_ptr, k_0, n_hidden, n_hidden, ks, cols), PRECISION, HIDDEN_OPERANDS)
    return out


@triton.jit
def _velocity(x, time_bias_ptr, context_bias, w_x_ptr, w_h_ptr, b_h_ptr, w_out_ptr, b_out, scratch_ptr, n_dim, n_hidden,
              NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr, APPROXIMATE: tl.constexpr, RESIDUAL: tl.constexpr,
              HAS_CONTEXT: tl.constexpr, PRECISION: tl.constexpr, HIDDEN_OPERANDS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, K_STAGES: tl.constexpr):
    """v `(BLOCK_M, BLOCK_D)` at states x `(BLOCK_M, BLOCK_D)`, with the first layer's time bias `(H,)` at
    time_bias_ptr and, when HAS_CONTEXT, its per-sample context bias `(BLOCK_M, BLOCK_H)`; padded columns
    stay zero (act(0) = 0 for every activation)."""
    cols_h = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    w_x = _load_transposed(w_x_ptr, 0, n_dim, n_hidden, cols_d, cols_h)  # (BLOCK_D, BLOCK_H)
    w_out = _load_transposed(w_out_ptr, 0, n_hidden, n_dim, cols_h, cols_d)  # (BLOCK_H, BLOCK_D)
    pre_activation = tl.dot(x, w_x, input_precision=PRECISION) + tl.load(time_bias_ptr + cols_h, mask=cols_h < n_hidden,
                                                                          other=0.0)[None, :]
    if HAS_CONTEXT:
        pre_activation += context_bias
    z = activate(pre_activation, ACTIVATION, APPROXIMATE)
    for layer in tl.static_range(NUM_LAYERS - 1):
        b = tl.load(b_h_ptr + layer * n_hidden + cols_h, mask=cols_h < n_hidden, other=0.0)
        z = _hidden_input(z, HIDDEN_OPERANDS)
        out = activate(_hidden_matmul(z, w_h_ptr + layer * n_hidden * n_hidden, scratch_ptr, n_hidden, BLOCK_M, BLOCK_H, BLOCK_K,
                                       PRECISION, HIDDEN_OPERANDS, K_STAGES) + b[None, :], ACTIVATION, APPROXIMATE)
        if RESIDUAL:
            z = z + out
        else:
            z = out
    return tl.dot(z, w_out, input_precision=PRECISION) + b_out[None, :]


@triton.jit
def _velocity_streamed(x, time_bias_ptr, context_rows_ptr, row_ok, w_x_ptr, w_h_ptr, b_h_ptr, w_out_ptr, b_out, scratch_ptr,
                       n_dim, n_hidden, NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr, APPROXIMATE: tl.constexpr,
                       RESIDUAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, PRECISION: tl.constexpr,
                       HIDDEN_OPERANDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, K_STAGES: tl.constexpr):
    """`_velocity` for wide layers, BLOCK_N of a layer's outputs at a time, so that no `(BLOCK_M, BLOCK_H)` tensor
    lives in registers: each layer reads its input from one of this program's two scratch tiles
    `(BLOCK_M, BLOCK_H)` (global memory, cache-resident) in BLOCK_K-wide chunks and writes its activations to the
    other (as the next layer's products take them, `_hidden_input`); the last hidden layer's chunks go straight into
    the output layer. The context bias is read per chunk from `context_rows_ptr` (this tile's rows of the `(n, H)`
    context bias) when HAS_CONTEXT."""
    local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_H
    cols_n = tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    ks = tl.arange(0, BLOCK_K)
    v = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32) + b_out[None, :]
    tl.debug_barrier()  # every thread has read the scratch tiles of the previous evaluation
    for n_0 in range(0, BLOCK_H, BLOCK_N):
        cols = n_0 + cols_n
        pre = tl.dot(x, _load_transposed(w_x_ptr, 0, n_dim, n_hidden, cols_d, cols), input_precision=PRECISION)
        pre += tl.load(time_bias_ptr + cols, mask=cols < n_hidden, other=0.0)[None, :]
        if HAS_CONTEXT:
            pre += tl.load(context_rows_ptr + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < n_hidden), other=0.0)
        z = activate(pre, ACTIVATION, APPROXIMATE)
        if NUM_LAYERS == 1:
            v += tl.dot(z, _load_transposed(w_out_ptr, n_0, n_hidden, n_dim, cols_n, cols_d), input_precision=PRECISION)
        else:
            tl.store(scratch_ptr + local + cols[None, :], _hidden_input(z, HIDDEN_OPERANDS))
    for layer in tl.static_range(NUM_LAYERS - 1):
        source = scratch_ptr + (layer % 2) * BLOCK_M * BLOCK_H
        target = scratch_ptr + ((layer + 1) % 2) * BLOCK_M * BLOCK_H
        w_ptr = w_h_ptr + layer * n_hidden * n_hidden
        tl.debug_barrier()  # the layer's input is written in full (and the tile it writes no longer read)
        for n_0 in range(0, BLOCK_H, BLOCK_N):
            cols = n_0 + cols_n
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k_0 in tl.range(0, BLOCK_H, BLOCK_K, num_stages=K_STAGES):
                acc += _hidden_dot(tl.load(source + local + (k_0 + ks)[None, :]),
                                   _load_transposed(w_ptr, k_0, n_hidden, n_hidden, ks, cols), PRECISION, HIDDEN_OPERANDS)
            b = tl.load(b_h_ptr + layer * n_hidden + cols, mask=cols < n_hidden, other=0.0)
            z = activate(acc + b[None, :], ACTIVATION, APPROXIMATE)
            if RESIDUAL:
                z += tl.load(source + local + cols[None, :])
            if layer == NUM_LAYERS - 2:
                v += tl.dot(z, _load_transposed(w_out_ptr, n_0, n_hidden, n_dim, cols_n, cols_d), input_precision=PRECISION)
            else:
                tl.store(target + local + cols[None, :], _hidden_input(z, HIDDEN_OPERANDS))
    return v


@triton.jit
def _combine2(k_1, k_2, W_1: tl.constexpr, W_2: tl.constexpr):
    """W_1 k_1 + W_2 k_2 with zero weights left out (as `fastflow.fm.solvers._combine`)."""
    if W_1 == 0.0:
        out = W_2 * k_2
    elif W_2 == 0.0:
        out = W_1 * k_1
    else:
        out = W_1 * k_1 + W_2 * k_2
    return out


@triton.jit
def _combine3(k_1, k_2, k_3, W_1: tl.constexpr, W_2: tl.constexpr, W_3: tl.constexpr):
    if W_3 == 0.0:
        out = _combine2(k_1, k_2, W_1, W_2)
    elif W_1 == 0.0 and W_2 == 0.0:
        out = W_3 * k_3
    else:
        out = _combine2(k_1, k_2, W_1, W_2) + W_3 * k_3
    return out


@triton.jit
def _accumulate(total, k, W: tl.constexpr, FIRST: tl.constexpr):
    """total + W k, or W k when FIRST (zero weights skipped; the caller starts from zeros)."""
    if W == 0.0:
        out = total
    elif FIRST:
        out = W * k
    else:
        out = total + W * k
    return out


@triton.jit
def _evaluate(x, time_bias, context_bias, context_rows_ptr, row_ok, w_x, w_h, b_h_ptr, w_out, b_out, scratch, n_dim, n_hidden,
              NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr, APPROXIMATE: tl.constexpr, RESIDUAL: tl.constexpr,
              HAS_CONTEXT: tl.constexpr, PRECISION: tl.constexpr, HIDDEN_OPERANDS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
              K_STAGES: tl.constexpr):
    """The velocity at x `(BLOCK_M, BLOCK_D)`: whole layers in registers (`_velocity`) when BLOCK_N = BLOCK_H,
    else in chunks of BLOCK_N outputs (`_velocity_streamed`)."""
    if BLOCK_N == BLOCK_H:
        v = _velocity(x, time_bias, context_bias, w_x, w_h, b_h_ptr, w_out, b_out, scratch, n_dim, n_hidden, NUM_LAYERS,
                      ACTIVATION, APPROXIMATE, RESIDUAL, HAS_CONTEXT, PRECISION, HIDDEN_OPERANDS, BLOCK_M, BLOCK_D, BLOCK_H,
                      BLOCK_K, K_STAGES)
    else:
        v = _velocity_streamed(x, time_bias, context_rows_ptr, row_ok, w_x, w_h, b_h_ptr, w_out, b_out, scratch, n_dim,
                               n_hidden, NUM_LAYERS, ACTIVATION, APPROXIMATE, RESIDUAL, HAS_CONTEXT, PRECISION,
                               HIDDEN_OPERANDS, BLOCK_M, BLOCK_D, BLOCK_H, BLOCK_K, BLOCK_N, K_STAGES)
    return v


@triton.jit
def _integrate_tile(
    tile, x_ptr, out_ptr, context_bias_ptr, time_bias_ptr, step_ptr, scratch, w_x_ptr, w_h_ptr, b_h_ptr, w_out_ptr, b_out_ptr,
    n_rows, n_dim, n_hidden, n_steps, weight_offset,
    A21: tl.constexpr, A31: tl.constexpr, A32: tl.constexpr, A41: tl.constexpr, A42: tl.constexpr, A43: tl.constexpr,
    B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, B4: tl.constexpr,
    STAGES: tl.constexpr, NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr, APPROXIMATE: tl.constexpr,
    RESIDUAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, PRECISION: tl.constexpr, HIDDEN_OPERANDS: tl.constexpr,
    RESIDENT_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    K_STAGES: tl.constexpr,
):
    """Integrate the BLOCK_M samples of `tile` through every step, with `scratch` this program's scratch tiles."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # int64: n·H may pass 2^31
    row_ok = rows < n_rows
    cols_d = tl.arange(0, BLOCK_D)
    cols_h = tl.arange(0, BLOCK_H)
    state_mask = row_ok[:, None] & (cols_d[None, :] < n_dim)
    state_offsets = rows[:, None] * n_dim + cols_d[None, :]
    x = tl.load(x_ptr + state_offsets, mask=state_mask, other=0.0)
    b_out = tl.load(b_out_ptr + cols_d, mask=cols_d < n_dim, other=0.0)
    context_rows = context_bias_ptr + rows[:, None] * n_hidden  # the streamed layers read their chunk of it
    context_bias = 0.0  # unused without context, or when streamed
    if HAS_CONTEXT and BLOCK_N == BLOCK_H:
        context_bias = tl.load(context_rows + cols_h[None, :], mask=row_ok[:, None] & (cols_h[None, :] < n_hidden), other=0.0)

    for step in range(n_steps):
        h = tl.load(step_ptr + step)
        if RESIDENT_WEIGHTS:  # loop-invariant loads: the compiler keeps the weights on chip for all steps
            w_x, w_h, w_out = w_x_ptr, w_h_ptr, w_out_ptr
        else:  # weight_offset = 0 at run time: loads stay in the loop and stream from cache (too big to keep)
            w_x, w_h, w_out = w_x_ptr + step * weight_offset, w_h_ptr + step * weight_offset, w_out_ptr + step * weight_offset
        time_bias = time_bias_ptr + step * STAGES * n_hidden
        k_1 = _evaluate(x, time_bias, context_bias, context_rows, row_ok, w_x, w_h, b_h_ptr, w_out, b_out, scratch, n_dim,
                        n_hidden, NUM_LAYERS, ACTIVATION, APPROXIMATE, RESIDUAL, HAS_CONTEXT, PRECISION, HIDDEN_OPERANDS,
                        BLOCK_M, BLOCK_D, BLOCK_H, BLOCK_K, BLOCK_N, K_STAGES)
        total = _accumulate(tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), k_1, B1, True)
        if STAGES >= 2:
            k_2 = _evaluate(x + h * (A21 * k_1), time_bias + n_hidden, context_bias, context_rows, row_ok, w_x, w_h, b_h_ptr,
                            w_out, b_out, scratch, n_dim, n_hidden, NUM_LAYERS, ACTIVATION, APPROXIMATE, RESIDUAL, HAS_CONTEXT,
                            PRECISION, HIDDEN_OPERANDS, BLOCK_M, BLOCK_D, BLOCK_H, BLOCK_K, BLOCK_N, K_STAGES)
            total = _accumulate(total, k_2, B2, B1 == 0.0)
        if STAGES >= 3:
            k_3 = _evaluate(x + h * _combine2(k_1, k_2, A31, A32), time_bias + 2 * n_hidden, context_bias, context_rows,
                            row_ok, w_x, w_h, b_h_ptr, w_out, b_out, scratch, n_dim, n_hidden, NUM_LAYERS, ACTIVATION,
                            APPROXIMATE, RESIDUAL, HAS_CONTEXT, PRECISION, HIDDEN_OPERANDS, BLOCK_M, BLOCK_D, BLOCK_H,
                            BLOCK_K, BLOCK_N, K_STAGES)
            total = _accumulate(total, k_3, B3, B1 == 0.0 and B2 == 0.0)
        if STAGES >= 4:
            k_4 = _evaluate(x + h * _combine3(k_1, k_2, k_3, A41, A42, A43), time_bias + 3 * n_hidden, context_bias,
                            context_rows, row_ok, w_x, w_h, b_h_ptr, w_out, b_out, scratch, n_dim, n_hidden, NUM_LAYERS,
                            ACTIVATION, APPROXIMATE, RESIDUAL, HAS_CONTEXT, PRECISION, HIDDEN_OPERANDS, BLOCK_M,
                            BLOCK_D, BLOCK_H, BLOCK_K, BLOCK_N, K_STAGES)
            total = _accumulate(total, k_4, B4, B1 == 0.0 and B2 == 0.0 and B3 == 0.0)
        x = x + h * total
    tl.store(out_ptr + state_offsets, x, mask=state_mask)


@triton.jit(do_not_specialize=["weight_offset"])
def _mlp_ode_kernel(
    # pointers
    x_ptr, out_ptr, context_bias_ptr, time_bias_ptr, step_ptr, scratch_ptr,
    w_x_ptr, w_h_ptr, b_h_ptr, w_out_ptr, b_out_ptr,
    # dimensions
    n_rows, n_dim, n_hidden, n_steps, weight_offset,
    # Butcher tableau (rows of a, weights b), zero where absent
    A21: tl.constexpr, A31: tl.constexpr, A32: tl.constexpr, A41: tl.constexpr, A42: tl.constexpr, A43: tl.constexpr,
    B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, B4: tl.constexpr,
    # meta-parameters
    STAGES: tl.constexpr, NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr, APPROXIMATE: tl.constexpr,
    RESIDUAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, PRECISION: tl.constexpr, HIDDEN_OPERANDS: tl.constexpr,
    RESIDENT_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    K_STAGES: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """One program per tile of BLOCK_M samples, or (PERSISTENT) each program takes every num_programs-th tile,
    reusing its scratch tiles (one of BLOCK_M · BLOCK_H values, two when streamed)."""
    scratch = scratch_ptr + tl.program_id(0).to(tl.int64) * (1 if BLOCK_N == BLOCK_H else 2) * BLOCK_M * BLOCK_H
    if PERSISTENT:
        for tile in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
            _integrate_tile(tile, x_ptr, out_ptr, context_bias_ptr, time_bias_ptr, step_ptr, scratch, w_x_ptr, w_h_ptr,
                            b_h_ptr, w_out_ptr, b_out_ptr, n_rows, n_dim, n_hidden, n_steps, weight_offset,
                            A21, A31, A32, A41, A42, A43, B1, B2, B3, B4, STAGES, NUM_LAYERS, ACTIVATION, APPROXIMATE,
                            RESIDUAL, HAS_CONTEXT, PRECISION, HIDDEN_OPERANDS, RESIDENT_WEIGHTS, BLOCK_M, BLOCK_D,
                            BLOCK_H, BLOCK_K, BLOCK_N, K_STAGES)
    else:
        _integrate_tile(tl.program_id(0), x_ptr, out_ptr, context_bias_ptr, time_bias_ptr, step_ptr, scratch, w_x_ptr,
                        w_h_ptr, b_h_ptr, w_out_ptr, b_out_ptr, n_rows, n_dim, n_hidden, n_steps, weight_offset,
                        A21, A31, A32, A41, A42, A43, B1, B2, B3, B4, STAGES, NUM_LAYERS, ACTIVATION, APPROXIMATE,
                        RESIDUAL, HAS_CONTEXT, PRECISION, HIDDEN_OPERANDS, RESIDENT_WEIGHTS, BLOCK_M, BLOCK_D, BLOCK_H,
                        BLOCK_K, BLOCK_N, K_STAGES)


def default_block_k(block_h: int) -> int:
    """The hidden-width chunk per weight tile, from sm_90 compiles (bench/sm90.py: registers, spills, SASS; the H100
    sweep of 2026-11-26 found these defaults fastest at widths 64 and 256): widths up to 64 in one chunk (no scratch
    round trip per hidden layer, fewer instructions, no spills: RK4 3x64 with Triton 3.6, 4,520 instructions against
    5,568 in chunks of 16, which spill 248 B with a context), wider ones in chunks of 16 (one chunk spills at
    width 128)."""
    return block_h if block_h <= 64 else 16


def _coefficients(a: tuple[tuple[float, ...], ...], b: tuple[float, ...]) -> dict[str, float]:
    """The tableau as the kernel's constexpr A21..A43, B1..B4 (missing entries 0)."""
    values = {f"A{i + 1}{j + 1}": 0.0 for i in range(1, MAX_STAGES) for j in range(i)}
    values.update({f"B{i + 1}": 0.0 for i in range(MAX_STAGES)})
    for i, row in enumerate(a[1:], start=1):
        for j, a_ij in enumerate(row):
            values[f"A{i + 1}{j + 1}"] = float(a_ij)
    for i, b_i in enumerate(b):
        values[f"B{i + 1}"] = float(b_i)
    return values


def mlp_odeint_triton(x, steps, time_bias, context_bias, w_x, w_hidden, b_hidden, w_out, b_out, *,
                      a, b, activation: str, residual: bool, precision: str = "ieee", bf16: bool = False,
                      approximate: bool | None = None, resident: bool | None = None, block_m: int | None = None,
                      block_k: int | None = None, block_n: int | None = None, k_stages: int = 1,
                      programs: int | None = None, num_warps: int | None = None):
    """Integrate all steps in one launch.

    Arguments:
        x `(N, D)`: initial states. steps `(K,)`: signed step sizes h_k.
        time_bias `(K·S, H)`: first-layer bias of evaluation (step k, stage s) at row k·S + s, S = len(b).
        context_bias `(N, H)` or None. w_x `(H, D)`; w_hidden `(L-1, H, H)`, b_hidden `(L-1, H)`;
        w_out `(D, H)`, b_out `(D,)`: float32, contiguous, on one device (checked by the caller).
        a, b: the explicit Butcher tableau's rows and weights (at most 4 stages).
        precision: tl.dot input precision, "ieee" (fp32), "tf32" or "tf32x3" (with `bf16`, of the first and output
            layers only).
        bf16: the hidden layers' products on bfloat16 operands (each hidden layer's input rounded to bfloat16, its
            weights cast once per call), summed in float32; under TRITON_INTERPRET=1 (CPU tensors), whose bfloat16
            products are wrong, the same roundings on float32 values (`_hidden_input`).
        approximate: activations through the GPU's approximate tanh (`kernels.activations`); None: for TF32
            products on an NVIDIA GPU.
        block_m: samples per program (default 64 for TF32 and 3xTF32 products: sm_90's warpgroup MMA needs 64
            rows, and at 32 the 3xTF32 RK4 kernel spilled 3.5 KB per thread (bench/sm90.py), which made it 56x
            slower than TF32 on an H100; 32 for fp32 FMA products, which need more registers). block_k: chunk of the hidden width per weight tile (a power of 2 dividing
            BLOCK_H, default BLOCK_H up to 64, else 16; below BLOCK_H, a scratch buffer of N · BLOCK_H floats carries
            the activations).
        resident: keep the hidden weights on chip for the whole integration (loaded once) instead of
            reloading them (from cache) at each evaluation; None: when they take at most 64 KiB.
        block_n: outputs of a hidden layer per pass (a power of 2 in [16, BLOCK_H]; default BLOCK_H, the whole
            layer in registers); below BLOCK_H the layers stream through two scratch tiles per program
            (`_velocity_streamed`) and no `(block_m, BLOCK_H)` tensor is held in registers.
        k_stages: software-pipelining depth of the loop over weight chunks (1: none; 2-3 prefetch the next
            chunks' weight and activation tiles while the current one multiplies).
        programs: at most this many programs, each looping over tiles and reusing its scratch (None: one program
            per tile; with streamed layers on CUDA, 8 per SM, which bounds their two scratch tiles per program to
            ~140 MB on an H100 where one program per tile would take 2 GB for 10^6 samples at width 256).
    Returns:
        the states after the last step `(N, D)`.
    """
    n_rows, n_dim = x.shape
    n_hidden = w_x.shape[0]
    block_h = dot_tile(n_hidden)
    block_k = block_k or default_block_k(block_h)
    if block_k < 16 or block_k > block_h or block_h % block_k or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of 2 in [16, BLOCK_H = {block_h}], got {block_k}")
    block_n = block_n or block_h
    if block_n < 16 or block_n > block_h or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of 2 in [16, BLOCK_H = {block_h}], got {block_n}")
    if k_stages < 1 or (programs is not None and programs < 1):
        raise ValueError(f"k_stages and programs must be positive, got {k_stages} and {programs}")
    block_m = block_m or (32 if precision == "ieee" else 64)
    hidden_operands = (1 if x.is_cuda else 2) if bf16 else 0
    if bf16:
        w_hidden = w_hidden.bfloat16() if x.is_cuda else w_hidden.bfloat16().float()
    if resident is None:
        resident = w_hidden.shape[0] * block_h * block_h * w_hidden.element_size() <= 64 * 1024
    out = torch.empty_like(x)
    tiles = cdiv(n_rows, block_m)
    if programs is None and block_n < block_h and x.is_cuda:
        programs = 8 * torch.cuda.get_device_properties(x.device).multi_processor_count
    grid = (min(tiles, programs or tiles),)
    scratch_tiles = 2 if block_n < block_h else 1 if block_k < block_h else 0
    scratch = x.new_empty(grid[0] * scratch_tiles * block_m * block_h, dtype=w_hidden.dtype) if scratch_tiles else x  # x: unused
    _mlp_ode_kernel[grid](
        x, out, x if context_bias is None else context_bias, time_bias, steps, scratch,
        w_x, w_hidden, b_hidden, w_out, b_out,
        n_rows, n_dim, n_hidden, steps.shape[0], 0,
        **_coefficients(a, b),
        STAGES=len(b), NUM_LAYERS=w_hidden.shape[0] + 1, ACTIVATION=ACTIVATION_IDS[activation],
        APPROXIMATE=approximate_activations(precision, x.device, approximate), RESIDUAL=residual,
        HAS_CONTEXT=context_bias is not None, PRECISION=precision, HIDDEN_OPERANDS=hidden_operands, RESIDENT_WEIGHTS=resident,
        BLOCK_M=block_m, BLOCK_D=dot_tile(n_dim), BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_N=block_n, K_STAGES=k_stages,
        PERSISTENT=grid[0] < tiles, num_warps=num_warps or (8 if block_h >= 128 else 4),
        num_stages=1,  # no software pipelining of the step loop (its multi-buffered weight tiles overflow shared
        # memory); the weight-chunk loops take theirs from k_stages
    )
    return out
