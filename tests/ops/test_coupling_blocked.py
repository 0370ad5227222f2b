"""The native spline coupling without autograd runs block by block of rows (`conditioner_blocks`): it must
equal the reference layer, with partial last blocks, context, both directions and float32/float64."""

import pytest
import torch

from fastflow.backends import backends
from fastflow.ops.coupling import BLOCK_ROWS, conditioner_blocks, conditioner_ref, spline_coupling, spline_coupling_ref

pytestmark = pytest.mark.skipif(not backends()["native"].available, reason="fastflow._C is not built")


def _layer(rows, kept, context, changed, hidden, bins, dtype, depth=2):
    generator = torch.Generator().manual_seed(rows + kept + changed)
    sizes = [kept + context, *[hidden] * depth, changed * (3 * bins - 1)]
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        weights += [torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5, 0.1 * torch.randn(fan_out, generator=generator)]
    inputs = [2 * torch.randn(rows, n, generator=generator) for n in (kept, context, changed)]
    cast = [t.to(dtype) for t in (*inputs, *weights)]
    return cast[0], (cast[1] if context else None), cast[2], tuple(cast[3:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("rows, kept, context, changed", [(BLOCK_ROWS + 77, 1, 0, 1), (2 * BLOCK_ROWS + 1, 4, 3, 5), (100, 2, 0, 3)])
def test_blocked_layer_matches_reference(dtype, inverse, rows, kept, context, changed):
    """float64 agrees to rounding; in float32 the error against the float64 reference may be at most 5×
    the float32 reference's own (plus 1e-6): both round the conditioner and the knots alike."""
    tensors = _layer(rows, kept, context, changed, 24, 6, dtype)
    options = dict(num_bins=6, bound=3.0, inverse=inverse)
    with torch.no_grad():
        result = spline_coupling(*tensors, **options, backend="native")
    as_double = [t.double() if t is not None else None for t in tensors[:3]] + [tuple(w.double() for w in tensors[3])]
    truth = spline_coupling_ref(*as_double, **options)
    same_dtype = spline_coupling_ref(*tensors, **options)
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
        torch.testing.assert_close(output, expected[rows], atol=1e-12, rtol=1e-12)
    assert (covered == 1).all()


def test_gradients_still_flow_through_the_native_layer():
    """With autograd on, the native backend takes the unblocked path and differentiates."""
    kept, _, changed, weights = _layer(300, 2, 0, 2, 8, 4, torch.float64)
    weights = tuple(w.requires_grad_() for w in weights)
    out, ladj = spline_coupling(kept, None, changed, weights, num_bins=4, bound=3.0, inverse=False, backend="native")
    (out.sum() + ladj.sum()).backward()
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for w in weights)
