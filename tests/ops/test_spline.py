"""Native C++ spline kernel against the PyTorch reference: values, log-determinants and gradients."""

import pytest
import torch

from fastflow.backends import backends
from fastflow.ops.spline import rq_spline, rq_spline_ref

native_missing = not backends()["native"].available
pytestmark = pytest.mark.skipif(native_missing, reason="fastflow._C is not built")

# (dtype, atol, rtol) against the float64 reference: float64 agrees to rounding; float32 computes in
# double inside the kernel, so its error is the rounding of inputs and outputs (~1e-4 of the scale
# of the inverse's gradients with narrow bins, K=13).
TOLERANCES = [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-3, 1e-3)]


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
