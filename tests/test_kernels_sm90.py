"""The Triton kernels compile for an H100 (sm_90) within its shared memory: the fused coupling kernels at the
sizes the layers promise (conditioner width up to 256, data and context dims up to 64), the elementwise spline
kernels (up to 128 bins), the elementwise affine kernels, the fused runs of coupling layers and the fused ODE integrator (width 64 and 256), with exact and approximate
(`tanh.approx.f32`) activations. Compiling needs no GPU: Triton's bundled ptxas builds the cubin here; slow
(seconds per kernel), so out of the default run. Each compile runs in a fresh interpreter without
TRITON_INTERPRET (the test session runs Triton's interpreter) and prints its shared memory in bytes."""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.triton,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")]

H100_SHARED_MEMORY = 227 * 1024  # per block (opt-in maximum)


def _compiled_shared_memory(*arguments) -> int:
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, *map(str, arguments)], env=environment, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


@pytest.mark.parametrize("kernel", ["rq_forward", "rq_backward"])
@pytest.mark.parametrize("num_bins, inverse", [(8, 0), (8, 1), (128, 1)])
def test_spline_kernels_compile_for_an_h100(kernel, num_bins, inverse):
    assert _compiled_shared_memory(kernel, num_bins, inverse, 0, 0) <= H100_SHARED_MEMORY


@pytest.mark.parametrize("kernel", ["affine_forward", "affine_backward"])
def test_affine_transform_kernels_compile_for_an_h100(kernel):
    assert _compiled_shared_memory(kernel, 0, 32, 0, 0) <= H100_SHARED_MEMORY


@pytest.mark.parametrize("kernel", ["affine_step_forward", "affine_step_backward"])
@pytest.mark.parametrize("hidden, dim", [(128, 8), (256, 64)])
def test_affine_step_kernels_compile_for_an_h100(kernel, hidden, dim):
    assert _compiled_shared_memory(kernel, hidden, dim, 0, 0) <= H100_SHARED_MEMORY


@pytest.mark.parametrize("num_bins, dim", [(8, 8), (128, 64)])
def test_spline_step_kernel_compiles_for_an_h100(num_bins, dim):
    assert _compiled_shared_memory("spline_step", num_bins, dim, 0, 0) <= H100_SHARED_MEMORY


@pytest.mark.parametrize("transform", ["affine", "spline"])
@pytest.mark.parametrize("hidden, dim, context, approximate", [(128, 32, 0, 1), (256, 64, 64, 0), (256, 2, 0, 1)])
def test_coupling_kernels_fit_an_h100(transform, hidden, dim, context, approximate):
    assert _compiled_shared_memory(transform, hidden, dim, context, approximate) <= H100_SHARED_MEMORY


@pytest.mark.parametrize("transform", ["affine_flow", "spline_flow"])
@pytest.mark.parametrize("hidden, dim, context, approximate", [(128, 8, 0, 1), (256, 64, 64, 0)])
def test_fused_coupling_runs_fit_an_h100(transform, hidden, dim, context, approximate):
    assert _compiled_shared_memory(transform, hidden, dim, context, approximate) <= H100_SHARED_MEMORY


@pytest.mark.parametrize("transform", ["affine", "spline"])
@pytest.mark.parametrize("hidden, dim, context, approximate", [(128, 8, 0, 1), (128, 128, 64, 0)])
def test_fused_backward_fits_an_h100(transform, hidden, dim, context, approximate):
    """Sizes `kernels.coupling_backward.fits` admits, up to its largest (128 inputs, 64 changed coordinates, and for
    splines 32 bins: the size is the bin count there)."""
    from fastflow.kernels.coupling_backward import MAX_SIZES, fits

    changed = dim - dim // 2
    bins = MAX_SIZES[3] if dim == 128 else 8
    assert fits(hidden, changed + context, changed, bins if transform == "spline" else None)
    assert _compiled_shared_memory(f"{transform}_flow_backward", hidden, dim, context, approximate,
                                   bins) <= H100_SHARED_MEMORY


@pytest.mark.parametrize("hidden, dim, context, approximate", [(64, 2, 0, 1), (256, 10, 4, 1), (64, 2, 3, 0)])
def test_ode_kernel_fits_an_h100(hidden, dim, context, approximate):
    assert _compiled_shared_memory("ode", hidden, dim, context, approximate) <= H100_SHARED_MEMORY


@pytest.mark.parametrize("hidden, dim, context", [(256, 10, 4), (256, 2, 0)])
def test_streamed_ode_kernel_fits_an_h100_without_spills(hidden, dim, context):
    """The streamed layers (block_n 32, pipelined weight chunks, persistent programs) at 64 rows per program (128 rows
    spill 736 B with a per-sample context; block_n 64 spills 32 B with Triton 3.6)."""
    assert _compiled_shared_memory("ode_streamed", hidden, dim, context, 1) <= H100_SHARED_MEMORY


@pytest.mark.parametrize("kernel, hidden, dim, context", [("ode_bf16", 64, 2, 0), ("ode_bf16", 256, 10, 4),
                                                          ("ode_streamed_bf16", 256, 2, 0), ("ode_streamed_bf16", 256, 10, 4)])
def test_bf16_ode_kernel_fits_an_h100(kernel, hidden, dim, context):
    """The bfloat16 hidden products (weights and scratch tiles bfloat16) at the launch defaults, and streamed (block_n
    64, block_k 32, pipelined), which must not spill: 128 rows per program without a context (Triton 3.6 and 3.9:
    254-255 registers), 64 with a per-sample context (244; at 128 rows its chunk of context bias spills 472-560 B)."""
    assert _compiled_shared_memory(kernel, hidden, dim, context, 1) <= H100_SHARED_MEMORY


def _sm90():
    """bench/sm90.py (the sm_90 compile helpers)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("sm90", Path(__file__).parents[1] / "bench" / "sm90.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shared_memory(kernel: str, size: int, dim: int, context: int, approximate: int, bins: int = 8) -> int:
    """Bytes of shared memory of the sm_90 build of `kernel` ("rq_forward" / "rq_backward": the elementwise
    spline kernels with `size` bins, inverse when `dim`; "affine" / "spline": the coupling kernels with
    conditioner width `size`; "affine_flow" / "spline_flow": their fused runs; "affine_flow_backward" /
    "spline_flow_backward": their backward (splines of `bins` bins); "affine_step_forward" / "affine_step_backward": the affine
    training step after width-`size` hidden layers; "spline_step": a spline layer's step with `size` bins; "ode": the RK4 integrator of a 3-layer field of width `size`;
    "ode_streamed": the same with streamed layers, which must not spill; "ode_bf16" / "ode_streamed_bf16": both with
    bfloat16 hidden products)."""
    from fastflow.kernels import affine, coupling, spline

    sm90 = _sm90()
    _compile = sm90.compile_for_h100
    if kernel == "spline_step":  # a spline layer after its conditioner (`size` bins), without autograd
        compiled = sm90.compile_spline_step(dim, size)
    elif kernel.startswith("affine_step_"):  # an affine layer after its hidden layers (width `size`), training
        compiled = sm90.compile_affine_step(kernel.removeprefix("affine_step_"), size, dim)
    elif kernel.endswith("_flow_backward"):  # the backward of a fused run of coupling layers (width `size`)
        compiled = sm90.compile_coupling_flow_backward(kernel.removesuffix("_flow_backward"), size, dim, context,
                                                       approximate=bool(approximate), num_bins=bins)
    elif kernel.endswith("_flow"):  # a fused run of coupling layers
        compiled = sm90.compile_coupling_flow(kernel.removesuffix("_flow"), size, dim, context, approximate=bool(approximate))
    elif kernel.startswith("affine_"):  # the elementwise affine kernels on `dim` changed coordinates
        meta = {"INVERSE": True, **affine._launch_meta(dim), "num_stages": 1}
        if kernel == "affine_forward":
            compiled = _compile(affine._affine_forward_kernel, ["raw_ptr", "x_ptr", "out_ptr", "ladj_ptr"],
                                ["n_rows", "n_changed", "stride_x"], ["scale_bound"], meta)
        else:
            compiled = _compile(affine._affine_backward_kernel,
                                ["raw_ptr", "x_ptr", "grad_out_ptr", "grad_ladj_ptr", "grad_raw_ptr", "grad_x_ptr"],
                                ["n_rows", "n_changed", "stride_x", "stride_grad_out"], ["scale_bound"], meta)
    elif kernel.startswith("rq_"):
        floats = ["bound", "min_width", "min_height", "min_derivative", "derivative_shift"]
        meta = {"INVERSE": bool(dim), **spline._launch_meta(size, None), "num_stages": 1}
        if kernel == "rq_forward":
            compiled = _compile(spline._rq_forward_kernel, ["x_ptr", "p_ptr", "out_ptr", "ladj_ptr"],
                                ["n", "num_bins", "count", "stride_x"], floats, meta)
        else:
            compiled = _compile(spline._rq_backward_kernel,
                                ["x_ptr", "p_ptr", "grad_out_ptr", "grad_ladj_ptr", "grad_x_ptr", "grad_p_ptr"],
                                ["n", "num_bins", "count", "stride_x", "stride_grad_out", "stride_ladj_row",
                                 "stride_ladj_column"], floats, meta)
    elif kernel in ("ode", "ode_bf16"):
        compiled = sm90.compile_ode(size, dim, context, approximate=bool(approximate), bf16=kernel == "ode_bf16")
    elif kernel == "ode_streamed_bf16":
        compiled = sm90.compile_ode(size, dim, context, approximate=bool(approximate), block_m=64 if context else 128,
                                    block_k=32, block_n=64, k_stages=2, num_warps=8, bf16=True)
        assert sm90.resources(compiled)["stack"] == 0
    elif kernel == "ode_streamed":
        compiled = sm90.compile_ode(size, dim, context, approximate=bool(approximate), block_m=64, block_k=32, block_n=32,
                                    k_stages=2, persistent=True, num_warps=8)
        assert sm90.resources(compiled)["stack"] == 0

    else:
        kept, changed = dim // 2, dim - dim // 2
        pointers = ["kept_ptr", "context_ptr", "changed_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr", "w3_ptr", "b3_ptr",
                    "out_ptr", "ladj_ptr"]
        strides = ["stride_kept", "stride_context", "stride_changed"]
        options = dict(precision="tf32", approximate=bool(approximate))
        if kernel == "affine":
            compiled = _compile(coupling._affine_coupling_kernel, pointers,
                                ["n_rows", "n_kept", "n_context", "n_hidden", "n_changed", *strides], ["scale_bound"],
                                coupling.affine_meta(kept + context, size, changed, inverse=False, **options))
        else:
            compiled = _compile(coupling._spline_coupling_kernel, pointers,
                                ["n_rows", "n_kept", "n_context", "n_hidden", "n_changed", "num_bins", *strides],
                                ["bound", "min_width", "min_height", "min_derivative", "derivative_shift"],
                                coupling.spline_meta(kept + context, size, changed, 8, inverse=True, **options))
    if approximate:
        assert "tanh.approx.f32" in compiled.asm["ptx"]
    return compiled.metadata.shared


if __name__ == "__main__":
    print(_shared_memory(sys.argv[1], *map(int, sys.argv[2:])))
