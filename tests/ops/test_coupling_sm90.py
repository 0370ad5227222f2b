"""The fused coupling kernels compile for an H100 (sm_90) within its shared memory at the sizes the layers
promise (conditioner width up to 256, data and context dims up to 64). Compiling needs no GPU: Triton's
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
@pytest.mark.parametrize("transform", ["affine", "spline"])
@pytest.mark.parametrize("hidden, dim, context", [(128, 32, 0), (256, 64, 64), (256, 2, 0)])
def test_kernels_fit_an_h100(transform, hidden, dim, context):
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, transform, str(hidden), str(dim), str(context)],
                         env=environment, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[-1]) <= H100_SHARED_MEMORY


def _shared_memory(transform: str, hidden: int, dim: int, context: int) -> int:
    """Bytes of shared memory the sm_90 build of the layer's kernel needs."""
    from fastflow.kernels import coupling

    kept, changed = dim // 2, dim - dim // 2
    common = ["kept_ptr", "context_ptr", "changed_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr"]
    if transform == "affine":
        compiled = _compile(
            coupling._affine_coupling_kernel,
            common + ["w_scale_ptr", "b_scale_ptr", "w_shift_ptr", "b_shift_ptr", "out_ptr", "ladj_ptr"],
            ["n_rows", "n_kept", "n_context", "n_hidden", "n_changed"], ["scale_bound"],
            coupling.affine_meta(kept + context, hidden, changed, inverse=False),
        )
    else:
        parameters = [f"{w}_{kind}_ptr" for kind in ("width", "height", "dleft", "dright") for w in ("w", "b")]
        compiled = _compile(
            coupling._spline_coupling_kernel, common + parameters + ["out_ptr", "ladj_ptr"],
            ["n_rows", "n_kept", "n_context", "n_hidden", "n_changed", "num_bins"],
            ["bound", "min_width", "min_height", "min_derivative", "derivative_shift"],
            coupling.spline_meta(kept + context, hidden, changed, 8, inverse=True),
        )
    return compiled.metadata.shared


if __name__ == "__main__":
    print(_shared_memory(sys.argv[1], *map(int, sys.argv[2:])))
