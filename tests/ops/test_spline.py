"""Native C++ spline kernel against the PyTorch reference: values, log-determinants and gradients."""

import pytest
import torch

from fastflow.backends import backends
from fastflow.ops.spline import rq_spline, rq_spline_ref

native_missing = not backends()["native"].available
pytestmark = pytest.mark.skipif(native_missing, reason="fastflow._C is not built")

# (dtype, atol, rtol) against the float64 reference: float64 agrees to rounding; float32 runs the
# forward in float (~1e-6 relative) and the backward in double, so its error is the rounding of inputs
# and outputs (~1e-4 of the scale of the inverse's gradients with narrow bins, K=13).
TOLERANCES = [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-3, 1e-3)]
# The blocked forward computes float32 inputs in float: its error against the float64 reference may be
# at most this many times the float32 reference's own error (plus 1e-6); measured ratios are 1-4.
FLOAT32_ERROR_RATIO = 5.0


def _inputs(shape, num_bins, dtype, seed=0, scale=1.5):
    generator = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(*shape, generator=generator, dtype=torch.float64)
    params = torch.randn(*shape, 3 * num_bins - 1, generator=generator, dtype=torch.float64)
    return x.to(dtype).requires_grad_(), params.to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape, num_bins", [((257, 3), 8), ((64, 1), 1), ((31, 5), 13), ((3, 4, 2), 4)])
def test_native_matches_reference_forward_and_backward(dtype, atol, rtol, inverse, shape, num_bins):
    """Native in `dtype` against the float64 reference (the truth): both float paths differ from it only
    by the rounding of their inputs, which narrow bins amplify in the inverse's gradients."""
    x, params = _inputs(shape, num_bins, dtype)
    x_ref, params_ref = (t.detach().double().requires_grad_() for t in (x, params))
    out, ladj = rq_spline(x, params, bound=2.0, inverse=inverse, backend="native")
    out_ref, ladj_ref = rq_spline_ref(x_ref, params_ref, bound=2.0, inverse=inverse)
    assert out.dtype == ladj.dtype == dtype
    torch.testing.assert_close(out.double(), out_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(ladj.double(), ladj_ref, atol=atol, rtol=rtol)
    generator = torch.Generator().manual_seed(1)
    grad_out, grad_ladj = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))
    grads = torch.autograd.grad((out * grad_out.to(dtype) + ladj * grad_ladj.to(dtype)).sum(), (x, params))
    grads_ref = torch.autograd.grad((out_ref * grad_out + ladj_ref * grad_ladj).sum(), (x_ref, params_ref))
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == dtype
        # gradients reach ~1e3 for narrow bins: compare relative to their scale
        torch.testing.assert_close(g.double(), g_ref, atol=atol * (1 + g_ref.abs().max().item()), rtol=rtol)


def _isas():
    from fastflow import _C

    return _C.spline_isas()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("count, num_bins", [(1000, 8), (130, 1), (67, 2), (129, 13), (65, 128)])
def test_every_instruction_set_of_the_blocked_forward_matches_the_reference(dtype, inverse, count, num_bins):
    """Each build of the blocked forward (x86-64-v3 where the CPU has it, and the portable one), over
    counts that leave partial blocks of 64, tails included (scale 3 against bound 2)."""
    from fastflow import _C
    from fastflow.ops.spline import DERIVATIVE_SHIFT

    x, params = (t.detach() for t in _inputs((count,), num_bins, dtype, seed=count, scale=3.0))
    truth = rq_spline_ref(x.double(), params.double(), bound=2.0, inverse=inverse)
    same_dtype = rq_spline_ref(x, params, bound=2.0, inverse=inverse)
    for isa in _isas():
        result = torch.empty_like(x), torch.empty_like(x)
        _C.rq_spline_forward(x.numpy(), params.numpy(), *(t.numpy() for t in result), 2.0, inverse, DERIVATIVE_SHIFT, isa)
        for name, value, expected, reference in zip(("out", "ladj"), result, truth, same_dtype):
            if dtype == torch.float64:
                torch.testing.assert_close(value, expected, atol=1e-10, rtol=1e-10)
            else:
                limit = FLOAT32_ERROR_RATIO * (reference.double() - expected).abs().max().item() + 1e-6
                error = (value.double() - expected).abs().max().item()
                assert error <= limit, f"{isa} {name}: error {error:.2e} > {limit:.2e}"


def test_unknown_instruction_set_is_rejected():
    from fastflow import _C

    x, params = (t.detach() for t in _inputs((4,), 3, torch.float32))
    with pytest.raises(ValueError, match="not available"):
        _C.rq_spline_forward(x.numpy(), params.numpy(), x.clone().numpy(), x.clone().numpy(), 2.0, False, 0.5, "avx9000")


def test_native_tails_and_inside_points():
    x = torch.tensor([-5.0, -2.0, -1.999, 0.0, 1.999, 2.0, 7.0], dtype=torch.float64)
    params = torch.randn(7, 3 * 6 - 1, dtype=torch.float64)
    out, ladj = rq_spline(x, params, bound=2.0, backend="native")
    assert out[0] == -5.0 and out[-1] == 7.0 and ladj[0] == 0 and ladj[-1] == 0
    torch.testing.assert_close(out[[1, 5]], x[[1, 5]])  # knots at ±B are fixed
    back, _ = rq_spline(out, params, bound=2.0, inverse=True, backend="native")
    torch.testing.assert_close(back, x, atol=1e-12, rtol=1e-12)


def test_native_gradcheck_float64():
    x, params = _inputs((6, 2), 5, torch.float64, seed=3)
    for inverse in (False, True):
        assert torch.autograd.gradcheck(lambda a, b: rq_spline(a, b, bound=2.0, inverse=inverse, backend="native"), (x, params))


def test_custom_op_registration_passes_opcheck():
    x, params = _inputs((8, 2), 4, torch.float32)
    from fastflow.ops.spline import _rq_spline_native

    torch.library.opcheck(_rq_spline_native, (x, params, 2.0, False))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="3K-1"):
        rq_spline(torch.zeros(4), torch.zeros(4, 4), bound=1.0)
    with pytest.raises(TypeError, match="float64"):
        rq_spline(torch.zeros(4), torch.zeros(4, 5, dtype=torch.float64), bound=1.0)
    with pytest.raises(RuntimeError, match="native"):
        rq_spline(torch.zeros(4, dtype=torch.float16), torch.zeros(4, 5, dtype=torch.float16), bound=1.0, backend="native")
