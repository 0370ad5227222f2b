"""Coupling layers as single ops: the conditioner MLP on [kept, context], then the elementwise
transform of the changed half (affine, or rational-quadratic spline) and log|det J|.

`affine_coupling_ref` / `spline_coupling_ref` are the PyTorch references. The Triton path
(kernels/coupling.py) fuses the whole layer without autograd, so hidden activations never reach global
memory; under autograd, and for fp32 products on CUDA (`fuses_conditioner`), the conditioner runs in torch
(cuBLAS) and the transform through an elementwise Triton op with its backward kernel (kernels/spline.py,
kernels/affine.py). The layers of `fastflow.nn` run on the Triton backend as runs of layers
(`fastflow.ops.coupling_flow`: one fused launch with TF32 products, and a fused backward where `trains_fused`), where
`TritonAffineStep` takes an affine layer's last SiLU and conditioner layer into that op too, with the merge and the
next permutation, and `TritonSplineStep` a spline layer's splines with the merge and the next permutation; these
ops serve direct calls. On CPU the native backend
runs the spline's elementwise part through `rq_spline` (C++) and under autograd the conditioner in torch; without
autograd it runs either layer block by block of rows (`conditioner_blocks`), the CPU counterpart of that fusion:
the hidden activations of a block stay in cache, each hidden layer is a GEMM with its bias and SiLU in place, and
buffers are reused instead of faulting in fresh full-batch tensors at every op.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from fastflow._checks import check_floating, positive_finite
from fastflow.backends import device_key, resolve_backend, triton_device, triton_precision
from fastflow.ops.autograd import first_order
from fastflow.ops.linear import BLOCK_ROWS, linear_silu_into
from fastflow.ops.spline import (SPLINE_CONSTANTS, check_num_bins, native_unsupported, rq_spline,
                                 rq_spline_rows_native_into, spline_param_count)

__all__ = ["affine_coupling", "affine_coupling_ref", "spline_coupling", "spline_coupling_ref"]


def conditioner_hidden(kept: torch.Tensor, context: torch.Tensor | None, weights: tuple[torch.Tensor, ...], *,
                       activate_last: bool = True) -> torch.Tensor:
    """The conditioner's hidden layers: SiLU(linear) for each `(w, b)` pair of `weights` but the last, applied to
    [kept `(N, K)`, context `(N, C)`]; returns `(N, H)` (the last one's pre-activation unless `activate_last`)."""
    h = kept if context is None else torch.cat([kept, context.to(kept.dtype)], dim=1)
    for layer in range(0, len(weights) - 2, 2):
        h = F.linear(h, weights[layer], weights[layer + 1])
        if activate_last or layer < len(weights) - 4:
            h = F.silu(h)
    return h


def conditioner_ref(kept: torch.Tensor, context: torch.Tensor | None, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The conditioner MLP: linear layers `(w1, b1, …, w_last, b_last)` with SiLU between them,
    applied to [kept `(N, K)`, context `(N, C)`]; returns `(N, out)`."""
    return F.linear(conditioner_hidden(kept, context, weights), weights[-2], weights[-1])


OUTPUT_ALIGN = 8  # GEMM output columns padded to a multiple of this (23 -> 24 columns: 1.7x faster)


def conditioner_blocks(kept: torch.Tensor, context: torch.Tensor | None, weights: tuple[torch.Tensor, ...],
                       block_rows: int = BLOCK_ROWS) -> Iterator[tuple[slice, torch.Tensor]]:
    """`conditioner_ref` on CPU tensors block by block of rows, without autograd: yields (rows, output
    `(m, padded)`) with m <= block_rows, the `out` outputs in the first columns (`padded` rounds `out` up to a
    multiple of `OUTPUT_ALIGN`; zero weights make the rest). One buffer per layer serves every block (each
    yielded output is overwritten by the next block), so the activations stay cache-sized and no full-batch
    intermediate is allocated; hidden layers run `linear_silu_into`."""
    inputs = kept if context is None else torch.cat([kept, context.to(kept.dtype)], dim=1)
    n = inputs.shape[0]
    padding = -weights[-1].shape[0] % OUTPUT_ALIGN
    hidden = [(w.detach(), b.detach().contiguous()) for w, b in zip(weights[0:-2:2], weights[1:-1:2])]
    last_t, last_b = F.pad(weights[-2].detach(), (0, 0, 0, padding)).t(), F.pad(weights[-1].detach(), (0, padding))
    buffers = [inputs.new_empty(min(n, block_rows), w.shape[0]) for w, _ in hidden]
    output = inputs.new_empty(min(n, block_rows), last_t.shape[1])
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        h = inputs[start:stop]
        for (w, b), buffer in zip(hidden, buffers):
            h = linear_silu_into(h, w, b, buffer[: stop - start])
        yield slice(start, stop), torch.addmm(last_b, h, last_t, out=output[: stop - start])


def affine_coupling_ref(kept, context, changed, weights, *, scale_bound: float, inverse: bool,
                        transform: Callable | None = None):
    """Reference affine coupling.

    Arguments:
        kept `(N, K)`: coordinates that pass through and parametrize the transform.
        context `(N, C)` or None; changed `(N, T)`: the coordinates transformed.
        weights: the conditioner's `(w, b)` pairs; its `2T` outputs are (raw log-scale, shift) per
            changed coordinate. scale_bound: log-scales are bound·tanh(raw / bound).
        transform: the elementwise map `(raw, changed) -> (out, ladj)` (`_affine_transform`, or the Triton op).
    Returns:
        out `(N, T)` and log|det J| `(N,)` of the map applied (the inverse's when `inverse`).
    """
    return (transform or _affine_transform)(conditioner_ref(kept, context, weights), changed, scale_bound=scale_bound,
                                            inverse=inverse)


def _affine_transform(raw: torch.Tensor, changed: torch.Tensor, *, scale_bound: float, inverse: bool):
    """The affine map of `changed (N, T)` by the conditioner outputs `raw (N, 2T)` (raw log-scale, shift per
    coordinate): out `(N, T)` and log|det J| `(N,)`."""
    raw_scale, shift = raw.view(changed.shape[0], changed.shape[1], 2).unbind(-1)
    log_scale = scale_bound * torch.tanh(raw_scale / scale_bound)
    if inverse:
        return (changed - shift) * torch.exp(-log_scale), -log_scale.sum(-1)
    return changed * torch.exp(log_scale) + shift, log_scale.sum(-1)


class _TritonAffine(torch.autograd.Function):
    """`_affine_transform` as the elementwise Triton kernel (kernels/affine.py) and its backward kernel."""

    @staticmethod
    def forward(ctx, raw, changed, scale_bound: float, inverse: bool):
        from fastflow.kernels.affine import affine_forward_triton

        raw, changed = raw.detach().contiguous(), changed.detach()  # changed: a column slice is read in place
        ctx.save_for_backward(raw, changed)
        ctx.scale_bound, ctx.inverse = scale_bound, inverse
        return affine_forward_triton(raw, changed, scale_bound=scale_bound, inverse=inverse)

    @staticmethod
    @first_order
    def backward(ctx, grad_out, grad_ladj):
        from fastflow.kernels.affine import affine_backward_triton

        raw, changed = ctx.saved_tensors
        grad_out = torch.zeros_like(changed) if grad_out is None else grad_out
        grad_ladj = changed.new_zeros(changed.shape[0]) if grad_ladj is None else grad_ladj.contiguous()
        grad_raw, grad_changed = affine_backward_triton(raw, changed, grad_out, grad_ladj, scale_bound=ctx.scale_bound,
                                                        inverse=ctx.inverse)
        return grad_raw, grad_changed, None, None


def _affine_transform_triton(raw: torch.Tensor, changed: torch.Tensor, *, scale_bound: float, inverse: bool):
    """`_affine_transform` through `_TritonAffine` (float32 on CUDA, or under TRITON_INTERPRET=1)."""
    return _TritonAffine.apply(raw, changed, float(scale_bound), bool(inverse))


def affine_step(a, w3, b3, kept, changed, ladj_in, column_map, kept_0: int, changed_0: int, scale_bound: float,
                inverse: bool, precision: str):
    """`TritonAffineStep` without autograd (the kernel alone: no Function bookkeeping per layer); same arguments."""
    from fastflow.kernels.affine import affine_step_forward_triton

    return affine_step_forward_triton(a.contiguous(), w3.contiguous(), b3.contiguous(), kept, changed, ladj_in, column_map,
                                      kept_0=kept_0, changed_0=changed_0, scale_bound=scale_bound, inverse=inverse,
                                      precision=precision)


class TritonAffineStep(torch.autograd.Function):
    """An affine coupling layer from its conditioner's last hidden pre-activations, for training on the Triton
    backend (`kernels.affine.affine_step_forward_triton`): the last SiLU, the last layer, the map, the
    log-determinant added to the running one and the merge through the following permutation in one kernel, and
    one backward kernel (the last layer's weight gradients by cuBLAS from the raw-output gradients it writes).

    apply(a `(N, H)`, w3, b3, kept `(N, K)`, changed `(N, T)`, ladj_in `(N,)` or None, column_map `(D,)` int32,
    kept_0, changed_0, scale_bound, inverse, precision) -> (y `(N, D)`, ladj `(N,)`)."""

    @staticmethod
    def forward(ctx, a, w3, b3, kept, changed, ladj_in, column_map, kept_0: int, changed_0: int, scale_bound: float,
                inverse: bool, precision: str):
        a, w3, b3 = a.detach().contiguous(), w3.detach().contiguous(), b3.detach().contiguous()
        changed = changed.detach()
        ctx.save_for_backward(a, w3, b3, changed, column_map)
        ctx.options = dict(kept_0=kept_0, changed_0=changed_0, scale_bound=scale_bound, inverse=inverse, precision=precision)
        ctx.n_kept, ctx.has_ladj_in = kept.shape[1], ladj_in is not None
        return affine_step(a, w3, b3, kept.detach(), changed, None if ladj_in is None else ladj_in.detach(), column_map,
                           **ctx.options)

    @staticmethod
    @first_order
    def backward(ctx, grad_y, grad_ladj):
        from fastflow.kernels.affine import affine_step_backward_triton

        a, w3, b3, changed, column_map = ctx.saved_tensors
        grad_y = a.new_zeros(a.shape[0], ctx.n_kept + changed.shape[1]) if grad_y is None else grad_y
        grad_ladj = a.new_zeros(a.shape[0]) if grad_ladj is None else grad_ladj.contiguous()
        grad_a, grad_raw, grad_kept, grad_changed, h = affine_step_backward_triton(
            a, w3, b3, changed, column_map, grad_y, grad_ladj, n_kept=ctx.n_kept, **ctx.options)
        grad_w3 = grad_raw.t().mm(h) if ctx.needs_input_grad[1] else None
        grad_b3 = grad_raw.sum(0) if ctx.needs_input_grad[2] else None
        return (grad_a, grad_w3, grad_b3, grad_kept, grad_changed, grad_ladj if ctx.has_ladj_in else None,
                None, None, None, None, None, None)


def spline_step(params, kept, changed, ladj_in, column_map, kept_0: int, changed_0: int, bound: float, inverse: bool):
    """`TritonSplineStep` without autograd (the kernel alone); same arguments."""
    from fastflow.kernels.spline import spline_step_forward_triton

    return spline_step_forward_triton(params.contiguous(), kept, changed, ladj_in, column_map, kept_0=kept_0,
                                      changed_0=changed_0, bound=bound, inverse=inverse, constants=SPLINE_CONSTANTS)


class TritonSplineStep(torch.autograd.Function):
    """A spline coupling layer from its conditioner's outputs on the Triton backend
    (`kernels.spline.spline_step_forward_triton`: the splines, the log-determinant added to the running one and the
    merge through the following permutation in one kernel); backward: the upstream gradient gathered through the
    permutation and the spline's backward kernel (`kernels.spline.rq_spline_backward_triton`).

    apply(params `(N, T·(3K-1))`, kept `(N, K)`, changed `(N, T)`, ladj_in `(N,)` or None, column_map `(D,)` int32,
    kept_0, changed_0, bound, inverse) -> (y `(N, D)`, ladj `(N,)`)."""

    @staticmethod
    def forward(ctx, params, kept, changed, ladj_in, column_map, kept_0: int, changed_0: int, bound: float, inverse: bool):
        params, changed = params.detach().contiguous(), changed.detach()
        ctx.save_for_backward(params, changed, column_map)
        ctx.options = dict(kept_0=kept_0, changed_0=changed_0, n_kept=kept.shape[1], bound=bound, inverse=inverse)
        ctx.has_ladj_in = ladj_in is not None
        return spline_step(params, kept.detach(), changed, None if ladj_in is None else ladj_in.detach(), column_map,
                           kept_0, changed_0, bound, inverse)

    @staticmethod
    @first_order
    def backward(ctx, grad_y, grad_ladj):
        from fastflow.kernels.spline import rq_spline_backward_triton

        params, changed, column_map = ctx.saved_tensors
        options = ctx.options
        n_rows, n_changed = changed.shape
        grad_y = changed.new_zeros(n_rows, options["n_kept"] + n_changed) if grad_y is None else grad_y
        grad_ladj = changed.new_zeros(n_rows) if grad_ladj is None else grad_ladj
        grad_x = grad_y.index_select(1, column_map)  # the upstream gradient of the layer's input columns, in order
        grad_out = grad_x[:, options["changed_0"]:options["changed_0"] + n_changed]
        grad_kept = grad_x[:, options["kept_0"]:options["kept_0"] + options["n_kept"]]
        grad_changed, grad_params = rq_spline_backward_triton(
            changed, params.view(n_rows * n_changed, -1), grad_out, grad_ladj[:, None].expand(n_rows, n_changed),
            bound=options["bound"], inverse=options["inverse"], constants=SPLINE_CONSTANTS)
        return (grad_params.view(n_rows, -1), grad_kept, grad_changed.view(n_rows, n_changed),
                grad_ladj if ctx.has_ladj_in else None, None, None, None, None, None)


def _affine_coupling_blocked(kept, context, changed, weights, *, scale_bound: float, inverse: bool):
    """`affine_coupling_ref` block by block of rows (`conditioner_blocks`); no autograd. Shapes as there."""
    out, ladj = torch.empty_like(changed), changed.new_empty(changed.shape[0])
    for rows, raw in conditioner_blocks(kept, context, weights):
        out[rows], ladj[rows] = _affine_transform(raw[:, : 2 * changed.shape[1]], changed[rows], scale_bound=scale_bound,
                                                  inverse=inverse)
    return out, ladj


def spline_coupling_ref(kept, context, changed, weights, *, num_bins: int, bound: float, inverse: bool,
                        spline_backend: str = "reference"):
    """Reference spline coupling: the conditioner's `T(3K-1)` outputs parametrize `rq_spline` per
    changed coordinate. Shapes as `affine_coupling_ref`; `spline_backend` swaps in a faster spline."""
    params = conditioner_ref(kept, context, weights).view(changed.shape[0], changed.shape[1], 3 * num_bins - 1)
    out, ladj = rq_spline(changed, params, bound=bound, inverse=inverse, backend=spline_backend)
    return out, ladj.sum(-1)


def _spline_coupling_blocked(kept, context, changed, weights, *, num_bins: int, bound: float, inverse: bool):
    """`spline_coupling_ref` with the native spline, block by block of rows (`conditioner_blocks`);
    no autograd. Shapes as `affine_coupling_ref`."""
    changed = changed.contiguous()
    out, ladj = torch.empty_like(changed), changed.new_empty(changed.shape[0])
    for rows, params in conditioner_blocks(kept, context, weights):  # params (m, padded): read in place
        rq_spline_rows_native_into(changed[rows], params, out[rows], ladj[rows], num_bins=num_bins, bound=bound,
                                   inverse=inverse)
    return out, ladj


def _check(kept, context, changed, weights, layers: int) -> tuple[str | None, set[torch.dtype], list[torch.Tensor]]:
    """Why the fused Triton kernels cannot take these tensors (None when they can: float32 on a Triton device,
    `layers` conditioners of two hidden layers, six tensors each in `weights`), their dtypes, and the tensors; mixed
    devices or dtypes raise. (Two cheap passes over the tensors: a run of layers checks ~30 per call.)"""
    tensors = [kept, changed, *weights] + ([] if context is None else [context])
    if len({device_key(t) for t in tensors}) != 1:
        raise ValueError("coupling: inputs and weights must be on one device")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:  # (the native path failed inside pybind11, the affine reference promoted silently)
        raise ValueError(f"coupling: inputs and weights must share one dtype, got {sorted(map(str, dtypes))}")
    check_floating(kept.dtype, "coupling: inputs and weights")
    if len(weights) != 6 * layers:
        unfusable = "the Triton kernels take conditioners of two hidden layers (depth=2)"
    elif dtypes != {torch.float32}:
        unfusable = f"the Triton kernels take float32 only, got {sorted(map(str, dtypes))}"
    elif not triton_device(kept.device):
        unfusable = "Triton runs on CUDA tensors (on CPU only under TRITON_INTERPRET=1)"
    else:
        unfusable = None
    return unfusable, dtypes, tensors


def _supported(why: dict[str, str | None]) -> tuple[str, ...]:
    """The backends a coupling layer can run on, given why native and Triton cannot (None where they can): native
    on CPU float32/float64 (splines of at most `NATIVE_MAX_BINS` bins), Triton when fusable (automatic dispatch
    prefers it on CUDA: on an H100, `bench/results/gpu_coupling_2026-11-26_*H100*`, the fused kernel with TF32
    products ran log_prob and sample 1.7-30x faster than the fp32 reference; with autograd the Triton path was
    2.8-16x faster for splines, on a par for affine layers with fp32 products and 1.1-1.2x faster with TF32)."""
    return ("reference",) + tuple(name for name in ("native", "triton") if why[name] is None)


def check_layer_shapes(kept, context, changed, weights, outputs_per_coordinate: int) -> None:
    """A ValueError unless kept `(N, K)`, context `(N, C)` or None and changed `(N, T)` share their rows and the
    conditioner's `(w, b)` pairs chain from K + C inputs to `outputs_per_coordinate · T` outputs (the native and
    Triton kernels ran wrong shapes on other rows and columns and returned garbage)."""
    if kept.dim() != 2 or changed.dim() != 2 or (context is not None and context.dim() != 2):
        raise ValueError(f"coupling: kept, changed and context must be (N, ·) matrices, got {tuple(kept.shape)}, "
                         f"{tuple(changed.shape)} and {None if context is None else tuple(context.shape)}")
    rows = {kept.shape[0], changed.shape[0]} | (set() if context is None else {context.shape[0]})
    if len(rows) != 1:
        raise ValueError(f"coupling: kept, changed and context must have the same rows, got {sorted(rows)}")
    if len(weights) < 2 or len(weights) % 2:
        raise ValueError(f"coupling: weights must be the conditioner's (w, b) pairs, got {len(weights)} tensors")
    width = kept.shape[1] + (0 if context is None else context.shape[1])
    for layer, (w, b) in enumerate(zip(weights[0::2], weights[1::2]), 1):
        if w.dim() != 2 or w.shape[1] != width or b.shape != w.shape[:1]:
            raise ValueError(f"coupling: conditioner layer {layer} takes {width} inputs: it needs a weight (out, {width})"
                             f" and a bias (out,), got {tuple(w.shape)} and {tuple(b.shape)}")
        width = w.shape[0]
    if width != outputs_per_coordinate * changed.shape[1]:
        raise ValueError(f"coupling: the conditioner has {width} outputs; {changed.shape[1]} changed coordinates need "
                         f"{outputs_per_coordinate} each ({outputs_per_coordinate * changed.shape[1]})")


def fuses_conditioner(precision: str, device: torch.device) -> bool:
    """Whether the Triton backend runs a layer (or a run of layers) without autograd as one fused kernel, the
    conditioner MLP inside it: with tensor-core products ("tf32", "tf32x3"), and under the CPU interpreter. With
    fp32 products on CUDA ("ieee": CUDA cores inside Triton) the conditioner runs in torch (cuBLAS) and only the
    transform in Triton, as under autograd: on an H100 the fused spline flow took 28 ms (d = 8) where that path
    took 6.8 ms with its backward."""
    return precision != "ieee" or device.type != "cuda"


def _recording(tensors: list[torch.Tensor]) -> bool:
    """Whether autograd records a graph through these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class Dispatch(NamedTuple):
    """How a coupling layer (or run of layers) runs: the backend, whether autograd records through its tensors, the
    products' precision, and whether the Triton backend runs the conditioner inside its kernels
    (`fuses_conditioner`); `fused`: the fused kernel without autograd (under autograd, runs of layers train through
    the fused kernels, `fastflow.ops.coupling_flow`)."""

    backend: str
    recording: bool
    precision: str
    fuses: bool

    @property
    def fused(self) -> bool:
        return self.fuses and not self.recording


def dispatch(kept, context, changed, weights, backend: str | None, precision: str | None, layers: int = 1,
             num_bins: int | None = None) -> Dispatch:
    """The `Dispatch` of a coupling layer, or of a run of `layers` layers with `weights` holding each one's six
    tensors (`fastflow.ops.coupling_flow`); `num_bins` for spline layers."""
    unfusable, dtypes, tensors = _check(kept, context, changed, weights, layers)
    precision = triton_precision(precision, kept.device)
    why = {"native": native_unsupported(kept, dtypes, num_bins), "triton": unfusable}
    chosen = resolve_backend(backend, kept.device, supports=_supported(why), why=why)
    recording = _recording(tensors)
    return Dispatch(chosen, recording, precision, chosen == "triton" and fuses_conditioner(precision, kept.device))


def affine_coupling(kept, context, changed, weights, *, scale_bound: float, inverse: bool, backend: str | None = None,
                    precision: str | None = None):
    """`affine_coupling_ref` through the backend chosen by `fastflow.backends.resolve_backend`.

    Triton (float32 on CUDA, or TRITON_INTERPRET=1; automatic dispatch takes it on CUDA) fuses layers with two
    hidden layers without autograd, its products in `precision` ("ieee", "tf32" or "tf32x3"; None follows
    `torch.backends.cuda.matmul.allow_tf32`); under autograd, and without it for fp32 products on CUDA
    (`fuses_conditioner`), it runs the conditioner in torch and the affine map as the elementwise Triton op with
    its backward kernel (`_TritonAffine`); native (CPU)
    runs the whole layer by blocks of rows without autograd (`_affine_coupling_blocked`) and the reference under
    autograd; other inputs run the reference (forcing a backend that cannot run them raises).
    """
    check_layer_shapes(kept, context, changed, weights, 2)
    scale_bound = positive_finite(scale_bound, "scale_bound")
    how = dispatch(kept, context, changed, weights, backend, precision)
    chosen, recording, precision, fused = how.backend, how.recording, how.precision, how.fused
    reference = partial(affine_coupling_ref, scale_bound=scale_bound, inverse=inverse)
    if fused:
        from fastflow.kernels.coupling import affine_coupling_triton

        return affine_coupling_triton(kept, context, changed, weights, scale_bound=scale_bound, inverse=inverse,
                                      precision=precision)
    if chosen == "triton":
        return reference(kept, context, changed, weights, transform=_affine_transform_triton)
    if chosen == "native" and not recording:
        return _affine_coupling_blocked(kept, context, changed, weights, scale_bound=scale_bound, inverse=inverse)
    return reference(kept, context, changed, weights)


def spline_coupling(kept, context, changed, weights, *, num_bins: int, bound: float, inverse: bool, backend: str | None = None,
                    precision: str | None = None):
    """`spline_coupling_ref` through the chosen backend: `triton` fuses the layer without autograd (float32, two
    hidden layers; products in `precision` as in `affine_coupling`) and otherwise (under autograd, or fp32
    products on CUDA) runs the conditioner in torch and the spline as the Triton spline op (`rq_spline`, with its
    backward kernel); `native` runs the
    spline natively (with its backward) and without autograd the whole layer by blocks of rows
    (`_spline_coupling_blocked`)."""
    num_bins, bound = check_num_bins(num_bins), positive_finite(bound, "bound")
    check_layer_shapes(kept, context, changed, weights, spline_param_count(num_bins))
    how = dispatch(kept, context, changed, weights, backend, precision, num_bins=num_bins)
    chosen, recording, precision, fused = how.backend, how.recording, how.precision, how.fused
    reference = partial(spline_coupling_ref, num_bins=num_bins, bound=bound, inverse=inverse)
    if fused:
        from fastflow.kernels.coupling import spline_coupling_triton

        return spline_coupling_triton(kept, context, changed, weights, num_bins=num_bins, bound=bound, inverse=inverse,
                                      constants=SPLINE_CONSTANTS, precision=precision)
    if chosen == "triton":
        return reference(kept, context, changed, weights, spline_backend="triton")
    if chosen == "native" and not recording:
        return _spline_coupling_blocked(kept, context, changed, weights, num_bins=num_bins, bound=bound, inverse=inverse)
    if chosen == "native":
        return reference(kept, context, changed, weights, spline_backend="native")
    return reference(kept, context, changed, weights)
