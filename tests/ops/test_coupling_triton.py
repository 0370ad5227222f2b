"""Fused Triton coupling layers (affine, spline) against the PyTorch references, forward/inverse and
gradients: compiled on CUDA when a GPU is visible, else under TRITON_INTERPRET=1 on CPU (tests/conftest.py).

float32 tolerances: with fp32 products ("ieee", the default unless torch allows TF32) the kernel sums the
conditioner's products in another order than torch.mm, so outputs agree to ~1e-5 relative; 2e-4 leaves
room for the exp of the log-scales. TF32 products (10-bit mantissas) get 2e-2 at a realistic size.
"""

import pytest
import torch

from fastflow.backends import backends
from fastflow.nn import AffineCoupling, SplineCoupling
from fastflow.ops.coupling import affine_coupling, affine_coupling_ref, spline_coupling, spline_coupling_ref

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not backends()["triton"].available, reason=backends()["triton"].reason),
]
ATOL, RTOL = 2e-4, 2e-4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _layer_inputs(rows, kept, context, changed, hidden, seed=0, params_per_coordinate=2):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(DEVICE).requires_grad_()

    inputs = kept + context
    weights = (randn(hidden, inputs, scale=0.5), randn(hidden, scale=0.1), randn(hidden, hidden, scale=0.2),
               randn(hidden, scale=0.1), randn(params_per_coordinate * changed, hidden, scale=0.3),
               randn(params_per_coordinate * changed, scale=0.3))
    return randn(rows, kept), (randn(rows, context) if context else None), randn(rows, changed, scale=2.0), weights


GRADIENT_ERROR_RATIO = 10.0


def _assert_matches_reference(op, reference, inputs, **options):
    """`op(..., backend="triton")` against the float32 `reference`: the fused forward (no autograd) and the
    autograd path's outputs agree to ATOL/RTOL; the autograd path's vector-Jacobian products are as accurate
    as the float32 reference's against the float64 truth (error within GRADIENT_ERROR_RATIO of the reference's,
    plus 1e-5): the Triton spline's backward differentiates analytically, the reference by autograd, and both
    lose digits to cancellation in narrow bins."""
    leaves = [t for t in (inputs[0], inputs[1], inputs[2], *inputs[3]) if t is not None]
    expected = reference(*inputs, **options)
    with torch.no_grad():
        fused = op(*inputs, backend="triton", **options)
    differentiable = op(*inputs, backend="triton", **options)
    for a, b, c in zip(fused, differentiable, expected):
        torch.testing.assert_close(a, c, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(b, c, atol=ATOL, rtol=RTOL)
    generator = torch.Generator().manual_seed(1)
    cotangents = tuple(torch.randn(t.shape, generator=generator).to(DEVICE) for t in expected)
    grads = torch.autograd.grad(differentiable, leaves, cotangents)
    grads_ref = torch.autograd.grad(expected, leaves, cotangents)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    kept64, *rest = leaves64
    context64 = rest.pop(0) if inputs[1] is not None else None
    truth = reference(kept64, context64, rest[0], tuple(rest[1:]), **options)
    grads_truth = torch.autograd.grad(truth, leaves64, tuple(c.double() for c in cotangents))
    for g, g_ref, g_true in zip(grads, grads_ref, grads_truth):
        limit = GRADIENT_ERROR_RATIO * (g_ref.double() - g_true).abs().max().item() + 1e-5
        assert (g.double() - g_true).abs().max().item() <= limit


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("rows, kept, context, changed, hidden", [
    (70, 1, 0, 1, 16),    # 2-D, unconditional, rows not a multiple of the block
    (33, 2, 3, 3, 48),    # odd split, context, non-power-of-2 width
    (64, 4, 2, 5, 32),
    (20, 32, 64, 32, 256),  # the limits: 64-D, context 64, width 256 (second layer in 4 chunks of units)
    (9, 3, 1, 4, 200),      # width > 128, not a multiple of the chunk
])
def test_fused_matches_reference_forward_and_backward(inverse, rows, kept, context, changed, hidden, fused_fp32):
    inputs = _layer_inputs(rows, kept, context, changed, hidden)
    _assert_matches_reference(affine_coupling, affine_coupling_ref, inputs, scale_bound=3.0, inverse=inverse)


SPLINE_SHAPES = [(70, 1, 0, 1, 16, 8), (33, 2, 3, 3, 48, 5), (64, 4, 2, 5, 32, 10),
                 (20, 32, 64, 32, 256, 8),  # 64-D, context 64, width 256: 4 chunks of units, 4 of 8 coordinates
                 (9, 3, 1, 5, 200, 3)]      # width > 128, not a multiple of the chunk of units


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("rows, kept, context, changed, hidden, bins", SPLINE_SHAPES)
def test_fused_spline_matches_reference_forward_and_backward(inverse, rows, kept, context, changed, hidden, bins,
                                                             fused_fp32):
    inputs = _layer_inputs(rows, kept, context, changed, hidden, params_per_coordinate=3 * bins - 1)
    # changed ~ 2·N(0, 1): some values in the tails
    _assert_matches_reference(spline_coupling, spline_coupling_ref, inputs, num_bins=bins, bound=3.0, inverse=inverse)


@pytest.mark.parametrize("layer", [lambda b: AffineCoupling(5, 3, hidden=32, backend=b),
                                   lambda b: SplineCoupling(5, 3, hidden=32, num_bins=6, backend=b)])
@pytest.mark.parametrize("mode", ["autograd", "fused", "unfused"])
def test_layer_is_identical_across_backends(layer, mode, backend_pair, monkeypatch):
    """A layer on its own, both ways: under autograd (torch conditioner, Triton transform), without it in the fused
    kernel, and without it unfused (as on CUDA with fp32 products: `fuses_conditioner` false, forced here; on CUDA
    the "fused" case has fp32 products too, so it runs unfused as well)."""
    from fastflow.ops import coupling

    if mode == "unfused":
        monkeypatch.setattr(coupling, "fuses_conditioner", lambda precision, device: False)
    reference, fused = backend_pair(layer, scale=0.1)
    x, context = torch.randn(40, 5, device=DEVICE), torch.randn(40, 3, device=DEVICE)
    with torch.set_grad_enabled(mode == "autograd"):
        chosen = coupling.dispatch(x[:, :2], context, x[:, 2:], fused._weights(), "triton", None)
        assert chosen.fused == (mode == "fused" and coupling.fuses_conditioner(chosen.precision, DEVICE))
        for forward in (True, False):
            a = reference(x, context) if forward else reference.inverse(x, context)
            b = fused(x, context) if forward else fused.inverse(x, context)
            for u, v in zip(a, b):
                torch.testing.assert_close(u, v, atol=ATOL, rtol=RTOL)


def test_unsupported_inputs_name_the_fallback():
    kept, context, changed, weights = _layer_inputs(8, 2, 0, 2, 16)
    weights64 = tuple(w.detach().double() for w in weights)
    with pytest.raises(RuntimeError, match="does not implement"):
        affine_coupling(kept.detach().double(), None, changed.detach().double(), weights64, scale_bound=3.0, inverse=False, backend="triton")
    out, _ = affine_coupling(kept.detach().double(), None, changed.detach().double(), weights64, scale_bound=3.0, inverse=False)
    assert out.dtype == torch.float64  # auto: the reference handles float64


def test_unknown_precision_raises():
    kept, _, changed, weights = _layer_inputs(8, 2, 0, 2, 16)
    with pytest.raises(ValueError, match="precision must be one of"):
        affine_coupling(kept, None, changed, weights, scale_bound=3.0, inverse=False, backend="triton", precision="fp16")


@pytest.mark.gpu
@pytest.mark.parametrize("transform, dim", [("spline", 8), ("spline", 32), ("affine", 8)])
def test_gpu_flow_at_benchmark_size_matches_reference(transform, dim):
    """The benchmark's flow (65,536 rows, 5 layers, width 128, 8 bins) compiled on CUDA: log_prob (one step kernel
    per layer after the torch conditioner, with and without autograd, for fp32 products; one fused run with TF32
    products and no autograd), draws and parameter gradients of the Triton flow against the reference flow with the
    same state_dict. fp32
    products: log_prob to atol 1e-3 + rtol 1e-4 (5 layers of ~1e-5 relative differences), each parameter's
    gradient within 1e-3 relative (norm; the spline's backward kernel is analytic, the reference autograd).
    TF32 products (torch's allow_tf32 flag): log_prob to atol = rtol = 2e-2."""
    from fastflow.flows import FlowConfig
    from fastflow.nn import CouplingFlow

    config = FlowConfig(transform=transform, num_layers=5, hidden=128, num_bins=8)
    reference = CouplingFlow(dim, config=config, backend="reference").to(DEVICE)
    fused = CouplingFlow(dim, config=config, backend="triton").to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(65_536, dim, device=DEVICE)
    log_prob, log_prob_ref = fused.log_prob(x), reference.log_prob(x)
    torch.testing.assert_close(log_prob, log_prob_ref, atol=1e-3, rtol=1e-4)
    with torch.no_grad():  # fp32 products: the step kernels after cuBLAS conditioners, and sampling through them
        torch.testing.assert_close(fused.log_prob(x), log_prob_ref, atol=1e-3, rtol=1e-4)
        torch.manual_seed(3)
        draws = fused.sample(65_536)
        torch.manual_seed(3)
        torch.testing.assert_close(draws, reference.sample(65_536), atol=1e-3, rtol=1e-4)
    log_prob.mean().backward()
    log_prob_ref.mean().backward()
    for (name, p), p_ref in zip(fused.named_parameters(), reference.parameters()):
        relative = ((p.grad - p_ref.grad).norm() / p_ref.grad.norm().clamp_min(1e-12)).item()
        assert relative <= 1e-3, f"{name}: relative gradient difference {relative:.1e}"
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the fused run of all layers (one launch), vs the fp32 reference
    try:
        with torch.no_grad():
            torch.testing.assert_close(fused.log_prob(x), log_prob_ref, atol=2e-2, rtol=2e-2)
            draws = fused.sample(65_536)
        assert draws.isfinite().all()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.gpu
@pytest.mark.parametrize("transform", ["affine", "spline"])
def test_gpu_fused_training_at_benchmark_size_stays_within_tf32_error(transform, monkeypatch):
    """With TF32 products and the fused backward asked for (FASTFLOW_FUSED_BACKWARD=1, set for these tests) a
    coupling flow trains in two launches (`fastflow.ops.coupling_flow._FusedRun`). Its
    log_prob and parameter gradients (65,536 rows, 5 layers, width 128, 8 bins, d = 8), against the fp32 reference
    flow, are as accurate as those of the layer-step path with the same TF32 products in cuBLAS: relative error of
    the whole gradient vector within 2x that path's (+1e-5), log_prob within 2x its largest error (+1e-4)."""
    from fastflow.flows import FlowConfig
    from fastflow.nn import CouplingFlow
    from fastflow.ops import coupling

    config = FlowConfig(transform=transform, num_layers=5, hidden=128, num_bins=8)
    reference = CouplingFlow(8, config=config, backend="reference").to(DEVICE)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = CouplingFlow(8, config=config, backend="triton").to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(65_536, 8, device=DEVICE)

    def log_prob_and_gradient(flow):
        flow.zero_grad()
        log_prob = flow.log_prob(x)
        log_prob.mean().backward()
        return log_prob.detach(), torch.cat([p.grad.flatten() for p in flow.parameters()])

    log_prob_ref, gradient_ref = log_prob_and_gradient(reference)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    log_prob, gradient = log_prob_and_gradient(fused)
    monkeypatch.setattr(coupling, "fuses_conditioner", lambda precision, device: False)  # the layer steps, TF32 cuBLAS
    log_prob_steps, gradient_steps = log_prob_and_gradient(fused)
    assert (log_prob - log_prob_ref).abs().max() <= 2 * (log_prob_steps - log_prob_ref).abs().max() + 1e-4
    error, error_steps = ((g - gradient_ref).norm() / gradient_ref.norm() for g in (gradient, gradient_steps))
    assert error <= 2 * error_steps + 1e-5, (error.item(), error_steps.item())


def test_automatic_dispatch_offers_triton_for_float32_and_fuses_only_tensor_core_products(monkeypatch):
    """On an H100 the Triton backend beat the reference with and without autograd, but its fused kernel with fp32
    products (CUDA cores inside Triton) lost to cuBLAS: Triton is offered whenever the tensors fit it, and the
    conditioner is fused for TF32 products (or under the interpreter) only."""
    from fastflow.ops.coupling import _check, _supported, dispatch, fuses_conditioner

    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)
    kept, context, changed, weights = _layer_inputs(8, 2, 0, 2, 16)
    unfusable = _check(kept, None, changed, weights, 1)[0]
    assert unfusable is None and "triton" in _supported({"native": None, "triton": unfusable})
    as_float64 = [t.double() for t in (kept, changed, *weights)]
    unfusable = _check(as_float64[0], None, as_float64[1], as_float64[2:], 1)[0]
    assert "float32 only" in unfusable and "triton" not in _supported({"native": None, "triton": unfusable})
    cuda = torch.device("cuda")
    assert fuses_conditioner("tf32", cuda) and fuses_conditioner("tf32x3", cuda) and not fuses_conditioner("ieee", cuda)
    assert fuses_conditioner("ieee", torch.device("cpu"))  # the interpreter tests the fused kernels
    assert dispatch(kept, None, changed, weights, "triton", "ieee").recording  # the weights require grad
    assert not dispatch(kept, None, changed, weights, "triton", "ieee").fused
    with torch.no_grad():
        chosen = dispatch(kept, None, changed, weights, "triton", "ieee")
        assert chosen.fused and not chosen.recording and chosen.precision == "ieee"


@pytest.mark.parametrize("transform", ["affine", "spline"])
def test_3xtf32_products_match_reference_to_fp32_tolerance(transform):
    """precision="tf32x3" (three TF32 products per fp32 product) keeps the fp32 tolerance."""
    per = 2 if transform == "affine" else 3 * 6 - 1
    inputs = _layer_inputs(33, 2, 3, 3, 48, params_per_coordinate=per)
    if transform == "affine":
        op, ref, options = affine_coupling, affine_coupling_ref, dict(scale_bound=3.0, inverse=False)
    else:
        op, ref, options = spline_coupling, spline_coupling_ref, dict(num_bins=6, bound=3.0, inverse=True)
    with torch.no_grad():
        fused = op(*inputs, backend="triton", precision="tf32x3", **options)
    for a, b in zip(fused, ref(*inputs, **options)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("transform", ["affine", "spline"])
def test_strided_inputs_give_the_contiguous_result(transform, fused_fp32):
    """Column slices of wider tensors (rows further apart than their width) are read in place, and
    non-contiguous columns (a transposed tensor) copied: both give the contiguous inputs' outputs exactly."""
    bins = 5
    kept, context, changed, weights = _layer_inputs(37, 3, 2, 4, 32, params_per_coordinate=2 if transform == "affine" else 3 * bins - 1)
    op = (lambda *a: affine_coupling(*a, scale_bound=3.0, inverse=False, backend="triton")) if transform == "affine" else (
        lambda *a: spline_coupling(*a, num_bins=bins, bound=3.0, inverse=True, backend="triton"))
    with torch.no_grad():
        expected = op(kept, context, changed, weights)
        wide = torch.cat([kept, changed, context, torch.randn(37, 3, device=DEVICE)], dim=1)
        sliced = (wide[:, :3], wide[:, 7:9], wide[:, 3:7])
        assert sliced[0].stride(0) == 12 and not sliced[0].is_contiguous()
        transposed = tuple(t.t().contiguous().t() for t in (kept, context, changed))
        assert transposed[0].stride(1) != 1
        for inputs in (sliced, transposed):
            for a, b in zip(op(*inputs, weights), expected):
                torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("transform", ["affine", "spline"])
def test_gpu_approximate_activations_stay_within_tf32_error(transform):
    """TF32 products on CUDA take the approximate activations by default (`kernels.activations`). Against fp32
    products with exact activations, their outputs and log-determinants are as accurate as the exact activations
    with the same TF32 products: mean absolute error within 10 %, the 99.9 % quantile within 25 % (H100, these
    random weights: equal means, quantiles within 4 %). Elementwise bounds would not hold: the random weights
    make bins so narrow that TF32 rounding alone moves a few outputs by up to 5 and log-determinants by up to 12,
    and the approximate activations move the same elements by a different amount."""
    from fastflow.kernels.coupling import affine_coupling_triton, spline_coupling_triton
    from fastflow.ops.spline import SPLINE_CONSTANTS

    bins = 8
    kept, _, changed, weights = _layer_inputs(65_536, 4, 0, 4, 128, params_per_coordinate=2 if transform == "affine" else 3 * bins - 1)
    if transform == "affine":
        def run(approximate, precision="tf32"):
            return affine_coupling_triton(kept, None, changed, weights, scale_bound=3.0, inverse=False, precision=precision,
                                          approximate=approximate)
    else:
        def run(approximate, precision="tf32"):
            return spline_coupling_triton(kept, None, changed, weights, num_bins=bins, bound=3.0, inverse=False,
                                          constants=SPLINE_CONSTANTS, precision=precision, approximate=approximate)
    with torch.no_grad():
        default, approximate, exact, fp32 = run(None), run(True), run(False), run(False, "ieee")
    for a, b, c, truth in zip(default, approximate, exact, fp32):
        torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)  # the default on CUDA with TF32 products
        approximate_error, exact_error = (b - truth).abs().flatten(), (c - truth).abs().flatten()
        assert approximate_error.mean() <= 1.1 * exact_error.mean() + 1e-6
        assert approximate_error.quantile(0.999) <= 1.25 * exact_error.quantile(0.999) + 1e-6


def test_approximate_activations_need_an_nvidia_gpu():
    from fastflow.kernels.activations import approximate_activations

    assert not approximate_activations("tf32", torch.device("cpu"))
    assert not approximate_activations("ieee", torch.device("cpu"), False)
    with pytest.raises(ValueError, match="NVIDIA GPUs only"):
        approximate_activations("tf32", torch.device("cpu"), True)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("rows, changed", [(3, 1), (130, 40)])  # 40 coordinates: two passes of 32
def test_affine_transform_op_matches_reference_forward_and_backward(inverse, rows, changed):
    """The elementwise Triton affine op (training path) against `_affine_transform`, the same float32 formulas
    (tanh through a sigmoid, sums in another order): outputs and the gradients w.r.t. the raw outputs and inputs
    to a few float32 ulps of their largest magnitude (atol = 1e-6 · max|reference|, rtol = 1e-5), also when only
    one of out / log|det J| is used."""
    from fastflow.ops.coupling import _affine_transform, _affine_transform_triton

    generator = torch.Generator().manual_seed(3)
    raw = (2.0 * torch.randn(rows, 2 * changed, generator=generator)).to(DEVICE).requires_grad_()
    wide = (2.0 * torch.randn(rows, changed + 3, generator=generator)).to(DEVICE).requires_grad_()
    x = wide[:, 3:]  # a column slice, read in place (rows changed + 3 apart)
    fused, expected = (op(raw, x, scale_bound=3.0, inverse=inverse) for op in (_affine_transform_triton, _affine_transform))
    for a, b in zip(fused, expected):
        torch.testing.assert_close(a, b, atol=1e-6 * b.abs().max().item(), rtol=1e-5)
    # out's gradient arrives as a column slice of the merged gradient (as after a coupling layer's cat)
    fused, expected = ((torch.cat([outputs[0], raw[:, :1]], dim=1), outputs[1]) for outputs in (fused, expected))
    cotangents = (torch.randn(rows, changed + 1, generator=generator).to(DEVICE), torch.randn(rows, generator=generator).to(DEVICE))
    for used in ((0, 1), (0,), (1,)):
        grads, grads_ref = (torch.autograd.grad([outputs[i] for i in used], (raw, wide), [cotangents[i] for i in used],
                                                retain_graph=True, allow_unused=True) for outputs in (fused, expected))
        for g, g_ref, leaf in zip(grads, grads_ref, (raw, wide)):  # log|det J| alone does not depend on x
            g_ref = torch.zeros_like(leaf) if g_ref is None else g_ref
            torch.testing.assert_close(g, g_ref, atol=1e-6 * max(1.0, g_ref.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("chunk_columns", [32, None])
def test_spline_kernel_column_budget_keeps_the_result(chunk_columns):
    """More (coordinate, bin) columns per pass than the default 16 (`chunk_columns`, launch tuning; None: the
    whole layer) give the default launch's outputs: the same per-element arithmetic, the conditioner's products summed in other tile shapes (the
    file's ATOL/RTOL for reordered products; seen: 3e-6)."""
    from fastflow.kernels.coupling import spline_coupling_triton
    from fastflow.ops.spline import SPLINE_CONSTANTS

    kept, context, changed, weights = _layer_inputs(45, 4, 3, 6, 32, params_per_coordinate=3 * 8 - 1)
    options = dict(num_bins=8, bound=3.0, inverse=False, constants=SPLINE_CONSTANTS)
    with torch.no_grad():
        expected = spline_coupling_triton(kept, context, changed, weights, **options)
        chunked = spline_coupling_triton(kept, context, changed, weights, chunk_columns=chunk_columns, **options)
    for a, b in zip(chunked, expected):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
