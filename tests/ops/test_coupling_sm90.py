"""The fused coupling kernels compile for an H100 (sm_90) within its shared memory at the sizes the layers
promise (conditioner width up to 256, data and context dims up to 64), and so do the elementwise spline kernels
(up to 128 bins). Compiling needs no GPU: Triton's
bundled ptxas builds the cubin here; slow (seconds per kernel), so out of the default run. Each compile
runs in a fresh interpreter without TRITON_INTERPRET (the test session runs Triton's interpreter)."""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

H100_SHARED_MEMORY = 227 * 1024  # per block (opt-in maximum)


def _compile(kernel, pointers, integers, floats, meta):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {"num_stages": meta.pop("num_stages"), "num_warps": 4}
    signature = {**{n: "*fp32" for n in pointers}, **{n: "i32" for n in integers}, **{n: "fp32" for n in floats}}
    signature.update({name: "constexpr" for name in meta})
    constants = {(kernel.arg_names.index(name),): value for name, value in meta.items()}
    return triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("kernel", ["rq_forward", "rq_backward"])
@pytest.mark.parametrize("num_bins, inverse", [(8, 0), (8, 1), (128, 1)])
def test_spline_kernels_compile_for_an_h100(kernel, num_bins, inverse):
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, kernel, str(num_bins), str(inverse), "0"],
                         env=environment, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[-1]) <= H100_SHARED_MEMORY


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("transform", ["affine", "spline"])
@pytest.mark.parametrize("hidden, dim, context", [(128, 32, 0), (256, 64, 64), (256, 2, 0)])
def test_kernels_fit_an_h100(transform, hidden, dim, context):
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, transform, str(hidden), str(dim), str(context)],
                         env=environment, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[-1]) <= H100_SHARED_MEMORY


def _shared_memory(transform: str, hidden: int, dim: int, context: int) -> int:
    """Bytes of shared memory the sm_90 build of the layer's kernel needs ("rq_forward" / "rq_backward": the
    elementwise spline kernels with `hidden` bins)."""
    from fastflow.kernels import coupling, spline

    if transform.startswith("rq_"):
        inverse = bool(dim)
        floats = ["bound", "min_width", "min_height", "min_derivative", "derivative_shift"]
        meta = {"INVERSE": inverse, **spline._launch_meta(hidden, None), "num_stages": 1}
        if transform == "rq_forward":
            compiled = _compile(spline._rq_forward_kernel, ["x_ptr", "p_ptr", "out_ptr", "ladj_ptr"], ["n", "num_bins"],
                                floats, meta)
        else:
            compiled = _compile(spline._rq_backward_kernel,
                                ["x_ptr", "p_ptr", "grad_out_ptr", "grad_ladj_ptr", "grad_x_ptr", "grad_p_ptr"],
                                ["n", "num_bins"], floats, meta)
        return compiled.metadata.shared

    kept, changed = dim // 2, dim - dim // 2
    pointers = ["kept_ptr", "context_ptr", "changed_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr", "w3_ptr", "b3_ptr",
                "out_ptr", "ladj_ptr"]
    strides = ["stride_kept", "stride_context", "stride_changed"]
    if transform == "affine":
        compiled = _compile(
            coupling._affine_coupling_kernel, pointers,
            ["n_rows", "n_kept", "n_context", "n_hidden", "n_changed", *strides], ["scale_bound"],
            coupling.affine_meta(kept + context, hidden, changed, inverse=False),
        )
    else:
        compiled = _compile(
            coupling._spline_coupling_kernel, pointers,
            ["n_rows", "n_kept", "n_context", "n_hidden", "n_changed", "num_bins", *strides],
            ["bound", "min_width", "min_height", "min_derivative", "derivative_shift"],
            coupling.spline_meta(kept + context, hidden, changed, 8, inverse=True),
        )
    return compiled.metadata.shared


if __name__ == "__main__":
    print(_shared_memory(sys.argv[1], *map(int, sys.argv[2:])))
