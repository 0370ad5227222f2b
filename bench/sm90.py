"""Static facts about the Triton kernels on an H100 (sm_90) without a GPU: Triton compiles the cubin here
with its bundled ptxas, and cuobjdump/nvdisasm (bundled too) report registers, spill stack and the SASS
instruction mix. Used by tests/test_kernels_sm90.py (shared memory) and to compare kernel variants before a
GPU session can time them.

Usage: python bench/sm90.py   (without TRITON_INTERPRET; prints the RK4 kernel's resources per variant)
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

SASS_KEYS = ("HGMMA", "HMMA", "MUFU", "FFMA", "FMUL", "FADD", "FSETP", "FSEL", "LDS", "STS", "LDG", "LDGSTS", "STG", "LDL",
             "STL")


def compile_for_h100(kernel, pointers, integers, floats, meta: dict, num_warps: int = 4, int_pointers=(), bf16_pointers=()):
    """Compile a @triton.jit kernel for sm_90: pointer arguments float32 (`int_pointers` int32, `bf16_pointers`
    bfloat16), `integers` i32, `floats` fp32, and `meta` the constexprs plus "num_stages"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta = dict(meta)
    options = {"num_stages": meta.pop("num_stages"), "num_warps": num_warps}
    signature = {**{n: "*fp32" for n in pointers}, **{n: "*i32" for n in int_pointers}, **{n: "i32" for n in integers},
                 **{n: "fp32" for n in floats}, **{n: "*bf16" for n in bf16_pointers}}
    signature.update({name: "constexpr" for name in meta})
    constants = {(kernel.arg_names.index(name),): value for name, value in meta.items()}
    return triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32), options=options)


def resources(compiled) -> dict:
    """Registers and spill stack per thread, and the SASS instruction counts of a compiled kernel."""
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([f"{tools}/cuobjdump", "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([f"{tools}/nvdisasm", "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    ops = collections.Counter(m.group(1) for m in re.finditer(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
    return {"registers": int(registers), "stack": int(stack), "instructions": sum(ops.values()),
            **{key: ops[key] for key in SASS_KEYS if ops[key]}}


def compile_ode(hidden: int, dim: int = 2, context: int = 0, *, approximate: bool, resident: bool | None = None,
                block_m: int = 64, block_k: int | None = None, num_warps: int | None = None, block_n: int | None = None,
                k_stages: int = 1, persistent: bool = False, precision: str = "tf32", bf16: bool = False):
    """The RK4 integrator of a 3-hidden-layer SiLU field of width `hidden`, TF32 products (or `precision`; with `bf16`
    the hidden layers' on bfloat16 operands, their weights and the scratch tiles bfloat16), compiled for sm_90 (launch
    settings as `kernels.ode.mlp_odeint_triton`'s)."""
    from fastflow.kernels import ode

    block_h = ode.dot_tile(hidden)
    meta = {**ode._coefficients(((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
            "STAGES": 4, "NUM_LAYERS": 3, "ACTIVATION": 0, "APPROXIMATE": approximate, "RESIDUAL": False,
            "HAS_CONTEXT": bool(context), "PRECISION": precision, "HIDDEN_OPERANDS": int(bf16),
            "RESIDENT_WEIGHTS": block_h <= 128 if resident is None else resident,
            "BLOCK_M": block_m, "BLOCK_D": ode.dot_tile(dim), "BLOCK_H": block_h, "BLOCK_K": block_k or ode.default_block_k(block_h),
            "BLOCK_N": block_n or block_h, "K_STAGES": k_stages, "PERSISTENT": persistent, "num_stages": 1}
    low = ["scratch_ptr", "w_h_ptr"] if bf16 else []
    return compile_for_h100(ode._mlp_ode_kernel,
                            [name for name in ("x_ptr", "out_ptr", "context_bias_ptr", "time_bias_ptr", "step_ptr", "scratch_ptr",
                                               "w_x_ptr", "w_h_ptr", "b_h_ptr", "w_out_ptr", "b_out_ptr") if name not in low],
                            ["n_rows", "n_dim", "n_hidden", "n_steps", "weight_offset"], [], meta,
                            num_warps=num_warps or (8 if block_h >= 128 else 4), bf16_pointers=low)


def compile_coupling_flow(transform: str, hidden: int, dim: int, context: int = 0, *, approximate: bool,
                          inverse: bool = False, launch: dict | None = None):
    """The fused run of coupling layers (`kernels.coupling.coupling_flow_triton`) of `transform` ("affine" or
    "spline", 8 bins) with conditioners of width `hidden`, TF32 products, compiled for sm_90 with `launch`
    (block_m, block_hk, num_warps; default `FLOW_LAUNCH`)."""
    from fastflow.kernels import coupling

    launch = {**coupling.FLOW_LAUNCH, **(launch or {})}
    num_warps = launch.pop("num_warps")
    changed = dim - dim // 2  # the layers' larger half either way
    options = dict(inverse=inverse, precision="tf32", approximate=approximate, **launch)
    if transform == "affine":
        meta = {**coupling.affine_meta(changed + context, hidden, changed, **options), "BLOCK_T": 1, "BLOCK_K": 16, "T_CHUNK": 1}
    else:
        meta = {**coupling.spline_meta(changed + context, hidden, changed, 8, **options), "BLOCK_OUT": 16}
    meta.update(SPLINE=transform == "spline", BLOCK_D=coupling.next_power_of_2(dim), FIELDS=coupling.STEP_FIELDS)
    return compile_for_h100(coupling._coupling_flow_kernel,
                            ["x_ptr", "context_ptr", "out_ptr", "states_ptr", "ladj_ptr", "params_ptr"],
                            ["n_rows", "n_dim", "n_context", "n_hidden", "n_steps", "n_slots", "num_bins", "stride_context"],
                            ["scale_bound", "bound", "min_width", "min_height", "min_derivative", "derivative_shift"],
                            meta, num_warps=num_warps, int_pointers=["steps_ptr", "column_maps_ptr"])


def compile_coupling_flow_backward(transform: str, hidden: int, dim: int, context: int = 0, *, approximate: bool,
                                   num_bins: int = 8, block_m: int = 64, block_hk: int | None = None,
                                   num_warps: int | None = None):
    """The backward of a fused run of coupling layers (`kernels.coupling_backward.coupling_flow_backward_triton`) of
    `transform` ("affine", or "spline" with `num_bins`) with conditioners of width `hidden`, TF32 products, compiled
    for sm_90 (first-layer chunk and warps: the launcher's defaults unless given)."""
    from fastflow.kernels import coupling_backward, dot_tile

    changed = dim - dim // 2
    if transform == "affine":
        tiles = dict(BLOCK_OUT=dot_tile(changed), BLOCK_T=1, BLOCK_K=16, T_CHUNK=1)
    else:
        meta = coupling_backward.spline_meta(changed + context, hidden, changed, num_bins, inverse=False)
        tiles = dict(BLOCK_OUT=16, BLOCK_T=meta["BLOCK_T"], BLOCK_K=meta["BLOCK_K"], T_CHUNK=meta["T_CHUNK"])
    meta = dict(SPLINE=transform == "spline", CONTEXT_GRAD=bool(context), INVERSE=False, BLOCK_M=block_m,
                BLOCK_IN=dot_tile(changed + context), BLOCK_H=dot_tile(hidden),
                BLOCK_HK=min(block_hk or coupling_backward.BLOCK_HK, dot_tile(hidden)),
                **tiles, PRECISION="tf32",
                APPROXIMATE=approximate, FIELDS=coupling_backward.STEP_FIELDS, num_stages=1)
    return compile_for_h100(coupling_backward._coupling_flow_backward_kernel,
                            ["x_ptr", "states_ptr", "context_ptr", "grad_out_ptr", "grad_ladj_ptr", "grad_x_ptr",
                             "grad_states_ptr", "grad_context_ptr", "inputs_ptr", "h1_ptr", "g_a1_ptr", "h2_ptr",
                             "g_a2_ptr", "g_raw_ptr", "params_ptr"],
                            ["n_rows", "row_0", "n_group", "n_dim", "n_context", "n_hidden", "n_steps", "max_inputs",
                             "max_changed", "n_outputs", "num_bins", "stride_context"],
                            ["scale_bound", "bound", "min_width", "min_height", "min_derivative", "derivative_shift"], meta,
                            num_warps=num_warps or coupling_backward.default_warps(transform == "spline"),
                            int_pointers=["steps_ptr", "column_maps_ptr"])


def compile_affine_step(direction: str, hidden: int, dim: int):
    """The affine training step's kernel ("forward" or "backward", `kernels.affine.affine_step_*_triton`) after
    hidden layers of width `hidden`, TF32 products, compiled for sm_90."""
    from fastflow.kernels import affine

    kept, changed = dim // 2, dim - dim // 2
    meta = {**affine._step_meta(hidden, kept, changed, "tf32"), "INVERSE": False, "num_stages": 1}
    num_warps = meta.pop("num_warps")
    integers = ["n_rows", "n_dim", "n_hidden", "kept_0", "n_kept", "changed_0", "n_changed"]
    if direction == "forward":
        return compile_for_h100(affine._affine_step_forward_kernel,
                                ["a_ptr", "w3_ptr", "b3_ptr", "kept_ptr", "changed_ptr", "ladj_in_ptr", "y_ptr", "ladj_ptr"],
                                [*integers, "stride_kept", "stride_changed"], ["scale_bound"], {**meta, "HAS_LADJ_IN": True},
                                num_warps=num_warps, int_pointers=["column_map_ptr"])
    return compile_for_h100(affine._affine_step_backward_kernel,
                            ["a_ptr", "w3_ptr", "b3_ptr", "changed_ptr", "grad_y_ptr", "grad_ladj_ptr", "h_ptr",
                             "grad_a_ptr", "grad_raw_ptr", "grad_kept_ptr", "grad_changed_ptr"],
                            [*integers, "stride_changed", "stride_grad_y"], ["scale_bound"], meta, num_warps=num_warps,
                            int_pointers=["column_map_ptr"])


def compile_spline_step(dim: int, num_bins: int = 8, *, block_m: int | None = None, num_warps: int = 4,
                        inverse: bool = False):
    """A spline coupling layer's step without autograd (`kernels.spline.spline_step_forward_triton`, its default
    rows per program unless `block_m`) on `dim` coordinates, compiled for sm_90."""
    from fastflow.kernels import spline

    kept = dim // 2
    block_k = spline._launch_meta(num_bins, None)["BLOCK_K"]
    meta = {"INVERSE": inverse, "HAS_LADJ_IN": True, "BLOCK_M": block_m or spline.step_block_m(block_k), "BLOCK_K": block_k,
            "BLOCK_C": spline.next_power_of_2(max(kept, 1)), "num_stages": 1}
    return compile_for_h100(spline._spline_step_forward_kernel,
                            ["p_ptr", "kept_ptr", "changed_ptr", "ladj_in_ptr", "y_ptr", "ladj_ptr"],
                            ["n_rows", "n_dim", "kept_0", "n_kept", "changed_0", "n_changed", "num_bins", "stride_kept",
                             "stride_changed"],
                            ["bound", "min_width", "min_height", "min_derivative", "derivative_shift"], meta,
                            num_warps=num_warps, int_pointers=["column_map_ptr"])


def main() -> None:
    import triton

    print(f"Triton {triton.__version__}, sm_90, RK4, 3 hidden layers, TF32 products")
    for hidden, approximate, resident in ((64, False, True), (64, True, True), (64, True, False), (256, False, False),
                                          (256, True, False)):
        facts = resources(compile_ode(hidden, approximate=approximate, resident=resident))
        print(f"width {hidden:3d} approximate={approximate!s:5s} resident={resident!s:5s} {facts}")
    for hidden, launch in ((64, {}), (256, dict(block_m=128, block_k=32, block_n=64, k_stages=2, num_warps=8)),
                           (256, dict(block_m=64, block_k=32, block_n=32, k_stages=2, num_warps=8))):
        facts = resources(compile_ode(hidden, approximate=True, resident=hidden <= 128, bf16=True, **launch))
        print(f"width {hidden:3d} bfloat16 hidden products {launch or 'defaults'} {facts}")


if __name__ == "__main__":
    main()
