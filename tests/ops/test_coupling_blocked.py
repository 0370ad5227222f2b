"""The native spline and affine couplings without autograd run block by block of rows (`conditioner_blocks`):
they must equal the reference layer, with partial last blocks, context, both directions and float32/float64.
With autograd the spline runs natively and the conditioner in torch: values and gradients match the reference."""

import pytest
import torch

from fastflow.backends import backends
from fastflow.ops.coupling import (
    BLOCK_ROWS, OUTPUT_ALIGN, affine_coupling, affine_coupling_ref, conditioner_blocks, conditioner_ref,
    spline_coupling, spline_coupling_ref,
)

LAYERS = {  # transform: (op, reference, options, conditioner outputs per changed coordinate)
    "spline": (spline_coupling, spline_coupling_ref, dict(num_bins=6, bound=3.0), 17),
    "affine": (affine_coupling, affine_coupling_ref, dict(scale_bound=2.0), 2),
}

pytestmark = pytest.mark.skipif(not backends()["native"].available, reason="fastflow._C is not built")


def _layer(rows, kept, context, changed, hidden, bins, dtype, depth=2, outputs=None):
    """Inputs and conditioner weights of a layer; `outputs` per changed coordinate (default: a spline's)."""
    generator = torch.Generator().manual_seed(rows + kept + changed)
    sizes = [kept + context, *[hidden] * depth, changed * (outputs or 3 * bins - 1)]
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        weights += [torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5, 0.1 * torch.randn(fan_out, generator=generator)]
    inputs = [2 * torch.randn(rows, n, generator=generator) for n in (kept, context, changed)]
    cast = [t.to(dtype) for t in (*inputs, *weights)]
    return cast[0], (cast[1] if context else None), cast[2], tuple(cast[3:])


@pytest.mark.parametrize("transform", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("rows, kept, context, changed", [(BLOCK_ROWS + 77, 1, 0, 1), (2 * BLOCK_ROWS + 1, 4, 3, 5), (100, 2, 0, 3)])
def test_blocked_layer_matches_reference(transform, dtype, inverse, rows, kept, context, changed):
    """float64 agrees to rounding; in float32 the error against the float64 reference may be at most 5×
    the float32 reference's own (plus 1e-6): both round the conditioner and the knots alike."""
    op, reference, options, outputs = LAYERS[transform]
    tensors = _layer(rows, kept, context, changed, 24, 6, dtype, outputs=outputs)
    options = dict(options, inverse=inverse)
    with torch.no_grad():
        result = op(*tensors, **options, backend="native")
    as_double = [t.double() if t is not None else None for t in tensors[:3]] + [tuple(w.double() for w in tensors[3])]
    truth = reference(*as_double, **options)
    same_dtype = reference(*tensors, **options)
    assert result[0].dtype == result[1].dtype == dtype and result[0].shape == (rows, changed) and result[1].shape == (rows,)
    for value, expected, reference in zip(result, truth, same_dtype):
        if dtype == torch.float64:
            torch.testing.assert_close(value, expected, atol=1e-10, rtol=1e-10)
        else:
            limit = 5 * (reference.double() - expected).abs().max().item() + 1e-6
            assert (value.double() - expected).abs().max().item() <= limit


def test_blocks_cover_every_row_once_and_match_the_conditioner():
    kept, context, _, weights = _layer(2 * BLOCK_ROWS + 5, 3, 2, 2, 16, 4, torch.float64, depth=3)
    expected = conditioner_ref(kept, context, weights)
    covered = torch.zeros(kept.shape[0], dtype=torch.long)
    for rows, output in conditioner_blocks(kept, context, weights):
        covered[rows] += 1
        assert output.shape[1] % OUTPUT_ALIGN == 0
        torch.testing.assert_close(output[:, : expected.shape[1]], expected[rows], atol=1e-12, rtol=1e-12)
        assert (output[:, expected.shape[1] :] == 0).all()  # the padding: zero weights and biases
    assert (covered == 1).all()


@pytest.mark.parametrize("transform", sorted(LAYERS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_native_layer_with_autograd_matches_the_reference_values_and_gradients(transform, dtype, tolerance):
    """The layer under autograd (native spline) against the reference layer: outputs
    and the gradients of every input and weight (float32: relative to each gradient's largest entry)."""
    op, _, options, outputs = LAYERS[transform]
    tensors = _layer(300, 2, 2, 3, 16, 6, dtype, outputs=outputs)
    results = []
    for backend in ("native", "reference"):
        kept, context, changed = (t.clone().requires_grad_() for t in tensors[:3])
        weights = tuple(w.clone().requires_grad_() for w in tensors[3])
        out, ladj = op(kept, context, changed, weights, **options, inverse=False, backend=backend)
        (out.square().sum() + ladj.sum()).backward()
        results.append([out, ladj, kept.grad, context.grad, changed.grad, *(w.grad for w in weights)])
    for native, reference in zip(*results):
        scale = reference.abs().max().item()
        torch.testing.assert_close(native, reference, atol=tolerance * scale, rtol=tolerance)


@pytest.mark.parametrize("transform", sorted(LAYERS))
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_functional_ops_refuse_inconsistent_shapes_and_settings(transform, backend):
    """Extra changed rows came back as uninitialised memory from the native blocks, and a context or bin count
    the weights do not fit ran on other columns (the Triton kernels too); every backend refuses them first."""
    op, _, options, outputs = LAYERS[transform]
    kept, context, changed, weights = _layer(7, 3, 2, 4, 16, 6, torch.float32, outputs=outputs)
    run = lambda *args, **changes: op(*args, **{**options, **changes}, inverse=False, backend=backend)  # noqa: E731
    for bad_args, message in [
        ((kept, context, torch.zeros(9, 4), weights), "same rows"),
        ((kept, context[:1], changed, weights), "same rows"),
        ((kept, None, changed, weights), "layer 1 takes 3 inputs"),
        ((kept, torch.zeros(7, 5), changed, weights), "layer 1 takes 8 inputs"),
        ((kept, context, changed[:, :3], weights), "changed coordinates need"),
        ((kept, context, changed[0], weights), r"\(N, ·\) matrices"),
        ((kept, context, changed, weights[:-1]), r"\(w, b\) pairs"),
        ((kept, context, changed, weights[:2] + (weights[2][:, :3], weights[3]) + weights[4:]), "layer 2 takes 16"),
    ]:
        with pytest.raises(ValueError, match=message):
            run(*bad_args)
    if transform == "spline":
        with pytest.raises(ValueError, match="changed coordinates need"):
            run(kept, context, changed, weights, num_bins=5)  # 4 x 14 outputs, not the weights' 4 x 17
        for settings, message in [(dict(num_bins=0), "num_bins"), (dict(bound=-3.0), "bound"), (dict(bound=float("inf")), "bound")]:
            with pytest.raises(ValueError, match=message):
                run(kept, context, changed, weights, **settings)
    else:
        with pytest.raises(ValueError, match="scale_bound"):
            run(kept, context, changed, weights, scale_bound=0.0)
    as_ints = [t.long() for t in (kept, context, changed, *weights)]
    with pytest.raises(TypeError, match="float16/bfloat16/float32/float64"):
        run(as_ints[0], as_ints[1], as_ints[2], tuple(as_ints[3:]))
    as_complex = [t.to(torch.complex64) for t in (kept, context, changed, *weights)]
    with pytest.raises(TypeError, match="float16/bfloat16/float32/float64"):
        run(as_complex[0], as_complex[1], as_complex[2], tuple(as_complex[3:]))


def test_forcing_native_on_inputs_it_cannot_take_says_why():
    kept, context, changed, weights = _layer(7, 3, 2, 4, 16, 6, torch.float16)
    with pytest.raises(RuntimeError, match="native kernels take float32/float64"):
        spline_coupling(kept, context, changed, weights, num_bins=6, bound=3.0, inverse=False, backend="native")
    kept, context, changed, weights = _layer(7, 3, 2, 4, 16, 130, torch.float32)
    with pytest.raises(RuntimeError, match="at most 128 bins"):
        spline_coupling(kept, context, changed, weights, num_bins=130, bound=3.0, inverse=False, backend="native")
