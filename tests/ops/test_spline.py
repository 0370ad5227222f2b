"""Native C++ spline kernel against the PyTorch reference: values, log-determinants and gradients."""

import pytest
import torch

from fastflow.backends import backends
from fastflow.ops.spline import rq_spline, rq_spline_ref

native_missing = not backends()["native"].available
pytestmark = pytest.mark.skipif(native_missing, reason="fastflow._C is not built")

# float64 agrees with the float64 reference to rounding. float32 runs in float inside the kernels: its
# error against the float64 reference (the truth) may be at most this many times the float32 PyTorch
# reference's own error, plus a 1e-6 floor (measured ratios: 1-4 for values, up to 7.5 for gradients of
# narrow bins, K = 13, where both lose digits to cancellation; up to 9.3 at K = 36, where the kernel's float sums of
# the knots add to it: torch's CPU cumsum sums in double, and double sums here cost 2-5 % of the spline's time
# without lowering the worst ratios of 4,096 draws at K = 24-36).
FLOAT32_ERROR_RATIO = 10.0


def _assert_as_accurate(value, truth, same_dtype_reference, what=""):
    """float64: equal to rounding; float32: within FLOAT32_ERROR_RATIO of the float32 reference's error."""
    if value.dtype == torch.float64:
        torch.testing.assert_close(value, truth, atol=1e-10 * (1 + truth.abs().max().item()), rtol=1e-10)
        return
    limit = FLOAT32_ERROR_RATIO * (same_dtype_reference.double() - truth).abs().max().item() + 1e-6
    error = (value.double() - truth).abs().max().item()
    assert error <= limit, f"{what}: error {error:.2e} > {limit:.2e}"


def _inputs(shape, num_bins, dtype, seed=0, scale=1.5):
    generator = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(*shape, generator=generator, dtype=torch.float64)
    params = torch.randn(*shape, 3 * num_bins - 1, generator=generator, dtype=torch.float64)
    return x.to(dtype).requires_grad_(), params.to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape, num_bins", [((257, 3), 8), ((64, 1), 1), ((31, 5), 13), ((3, 4, 2), 4), ((128, 2), 36)])
def test_native_matches_reference_forward_and_backward(dtype, inverse, shape, num_bins):
    """Native in `dtype` against the float64 reference (the truth), values and gradients."""
    x, params = _inputs(shape, num_bins, dtype)
    x_ref, params_ref = (t.detach().double().requires_grad_() for t in (x, params))
    generator = torch.Generator().manual_seed(1)
    grad_out, grad_ladj = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))

    def run(backend, inputs):
        spline = rq_spline if backend else rq_spline_ref
        out, ladj = spline(*inputs, bound=2.0, inverse=inverse, **({"backend": backend} if backend else {}))
        weights = grad_out.to(out.dtype), grad_ladj.to(out.dtype)
        return (out, ladj, *torch.autograd.grad((out * weights[0] + ladj * weights[1]).sum(), inputs))

    native = run("native", (x, params))
    truth = run(None, (x_ref, params_ref))
    same_dtype = run(None, tuple(t.detach().clone().requires_grad_() for t in (x, params)))
    assert all(t.dtype == dtype for t in native)
    for name, value, expected, reference in zip(("out", "ladj", "grad x", "grad params"), native, truth, same_dtype):
        _assert_as_accurate(value, expected, reference, name)


def _triton_device() -> str:
    """Where the Triton spline runs here (CUDA when visible, else the interpreter); skips without Triton."""
    from fastflow.backends import backends

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in backends()["triton"].devices:
        pytest.skip(backends()["triton"].reason)
    return device


@pytest.mark.triton
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape, num_bins", [((257, 3), 8), ((64, 1), 1), ((31, 5), 13), ((3, 4, 2), 2)])
def test_triton_spline_matches_reference_forward_and_backward(inverse, shape, num_bins):
    """The elementwise Triton spline and its backward kernel (CUDA when visible, else the interpreter), float32,
    against the float64 reference, values and gradients, as accurate as the float32 reference."""
    device = _triton_device()
    x, params = (t.detach().to(device).requires_grad_() for t in _inputs(shape, num_bins, torch.float32))  # ~18% in tails
    x_ref, params_ref = (t.detach().double().requires_grad_() for t in (x, params))
    generator = torch.Generator().manual_seed(1)
    grad_out, grad_ladj = (torch.randn(shape, generator=generator, dtype=torch.float64).to(device) for _ in range(2))

    def run(inputs, **backend):
        spline = rq_spline if backend else rq_spline_ref
        out, ladj = spline(*inputs, bound=2.0, inverse=inverse, **backend)
        return (out, ladj, *torch.autograd.grad((out * grad_out.to(out.dtype) + ladj * grad_ladj.to(out.dtype)).sum(), inputs))

    fused = run((x, params), backend="triton")
    truth = run((x_ref, params_ref))
    same_dtype = run(tuple(t.detach().clone().requires_grad_() for t in (x, params)))
    for name, value, expected, reference in zip(("out", "ladj", "grad x", "grad params"), fused, truth, same_dtype):
        _assert_as_accurate(value, expected, reference, name)


@pytest.mark.triton
@pytest.mark.parametrize("inverse", [False, True])
def test_triton_spline_reads_column_slices_and_expanded_gradients_in_place(inverse):
    """A coupling layer's case: inputs a column slice `(N, T)` of a wider tensor, the log-determinant summed per
    row (its upstream gradient expanded, stride 0) and the output's upstream gradient a column slice too: the
    same values and gradients as with contiguous copies."""
    device = _triton_device()
    wide = (2.0 * torch.randn(37, 7)).to(device).requires_grad_()
    params = torch.randn(37, 3, 3 * 6 - 1).to(device).requires_grad_()
    cotangent_wide, cotangent_ladj = torch.randn(37, 9).to(device), torch.randn(37).to(device)

    def run(inputs, strided: bool):
        out, ladj = rq_spline(inputs, params, bound=2.0, inverse=inverse, backend="triton")
        if strided:  # out's gradient arrives as a column slice, ladj's expanded from its row sums
            padded = torch.cat([out, out.new_zeros(37, 6)], dim=1)
            loss = (padded * cotangent_wide).sum() + (ladj.sum(-1) * cotangent_ladj).sum()
        else:  # the same loss with contiguous gradients
            loss = (out * cotangent_wide[:, :3]).sum() + (ladj * cotangent_ladj[:, None]).sum()
        return (out, ladj, *torch.autograd.grad(loss, (wide, params)))

    in_place = run(wide[:, 2:5], strided=True)
    copied = run(wide[:, 2:5].contiguous(), strided=False)
    assert not wide[:, 2:5].is_contiguous()
    for a, b in zip(in_place, copied):
        torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)


def test_triton_spline_is_float32_only_and_automatic_only_on_cuda(monkeypatch):
    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="does not implement"):
        rq_spline(torch.zeros(4, dtype=torch.float64), torch.zeros(4, 5, dtype=torch.float64), bound=1.0, backend="triton")
    x, params = _inputs((6,), 2, torch.float32)
    expected = rq_spline_ref(x, params, bound=2.0)
    for value, reference in zip(rq_spline(x, params, bound=2.0), expected):  # auto on CPU: native or reference
        torch.testing.assert_close(value, reference, atol=1e-6, rtol=1e-6)


def _isas():
    from fastflow import _C

    return _C.spline_isas()


def _reference_with_gradients(x, params, grad_out, grad_ladj, inverse):
    x, params = (t.detach().clone().requires_grad_() for t in (x, params))
    out, ladj = rq_spline_ref(x, params, bound=2.0, inverse=inverse)
    grads = torch.autograd.grad((out * grad_out.to(x.dtype) + ladj * grad_ladj.to(x.dtype)).sum(), (x, params))
    return out.detach(), ladj.detach(), *grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("count, num_bins", [(1000, 8), (130, 1), (67, 2), (129, 13), (65, 128)])
def test_every_instruction_set_of_the_blocked_kernels_matches_the_reference(dtype, inverse, count, num_bins):
    """Each build of the blocked kernels (x86-64-v3 where the CPU has it, and the portable one), forward
    and backward, over counts that leave partial blocks of 64, tails included (scale 3, bound 2)."""
    from fastflow import _C
    from fastflow.ops.spline import DERIVATIVE_SHIFT

    x, params = (t.detach() for t in _inputs((count,), num_bins, dtype, seed=count, scale=3.0))
    generator = torch.Generator().manual_seed(count)
    grad_out, grad_ladj = (torch.randn(count, generator=generator, dtype=torch.float64) for _ in range(2))
    truth = _reference_with_gradients(x.double(), params.double(), grad_out, grad_ladj, inverse)
    same_dtype = _reference_with_gradients(x, params, grad_out, grad_ladj, inverse)
    arrays = [t.numpy() for t in (x, params, grad_out.to(dtype), grad_ladj.to(dtype))]
    for isa in _isas():
        result = [torch.empty_like(x), torch.empty_like(x), torch.empty_like(x), torch.empty_like(params)]
        _C.rq_spline_forward(*arrays[:2], *(t.numpy() for t in result[:2]), 2.0, inverse, DERIVATIVE_SHIFT, isa)
        _C.rq_spline_backward(*arrays, *(t.numpy() for t in result[2:]), 2.0, inverse, DERIVATIVE_SHIFT, isa)
        for name, value, expected, reference in zip(("out", "ladj", "grad x", "grad params"), result, truth, same_dtype):
            _assert_as_accurate(value, expected, reference, f"{isa} {name}")


@pytest.mark.parametrize("dtype, raw", [(torch.float32, 1e20), (torch.float32, 1e30), (torch.float64, 1e160)])
def test_log_determinants_of_huge_derivatives_stay_right(dtype, raw):
    """The kernels took log(s²G/den²): den² overflowed (raw derivatives from ~5e19 in float32) and the log of the 0
    ratio came out finite (-88.03 float32, -709.09 float64) where the log-det is -43.2 (float32, 1e20). (Forward
    only: with such derivatives the inverse's quadratic root is degenerate in the float64 reference too.)"""
    from fastflow import _C
    from fastflow.ops.spline import DERIVATIVE_SHIFT

    num_bins = 5
    params = torch.randn(4, 3 * num_bins - 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params[:, 2 * num_bins:] = raw
    x = torch.tensor([0.3, -0.7, 1.1, -1.9], dtype=torch.float64)
    expected = rq_spline_ref(x, params, bound=2.0)[1]
    for isa in _isas():
        out, ladj = torch.empty_like(x, dtype=dtype), torch.empty_like(x, dtype=dtype)
        _C.rq_spline_forward(x.to(dtype).numpy(), params.to(dtype).numpy(), out.numpy(), ladj.numpy(), 2.0, False,
                             DERIVATIVE_SHIFT, isa)
        torch.testing.assert_close(ladj.double(), expected, rtol=1e-5, atol=0, msg=isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("rows, count, num_bins, padding", [(131, 4, 8, 4), (70, 1, 3, 3), (33, 5, 13, 0), (9, 16, 8, 8)])
def test_every_instruction_set_of_the_row_spline_matches_the_reference(dtype, inverse, rows, count, num_bins, padding):
    """`rq_spline_rows_forward`: a coupling layer's spline reading padded parameter rows in place (rows of 64-element
    blocks straddle rows), its log|det| summed per row; per element as `rq_spline_ref`, tails included."""
    from fastflow import _C
    from fastflow.ops.spline import DERIVATIVE_SHIFT

    x, params = (t.detach() for t in _inputs((rows, count), num_bins, dtype, seed=rows, scale=3.0))
    padded = torch.cat([params.reshape(rows, -1), torch.full((rows, padding), float("nan"), dtype=dtype)], dim=1)
    out_truth, ladj_truth = rq_spline_ref(x.double(), params.double(), bound=2.0, inverse=inverse)
    out_ref, ladj_ref = rq_spline_ref(x, params, bound=2.0, inverse=inverse)
    for isa in _isas():
        out, ladj = torch.empty_like(x), x.new_empty(rows)
        _C.rq_spline_rows_forward(x.numpy(), padded.numpy(), out.numpy(), ladj.numpy(), num_bins, 2.0, inverse,
                                  DERIVATIVE_SHIFT, isa)
        _assert_as_accurate(out, out_truth, out_ref, f"{isa} out")
        _assert_as_accurate(ladj, ladj_truth.sum(-1), ladj_ref.sum(-1), f"{isa} ladj")


def test_row_spline_rejects_short_parameter_rows():
    from fastflow import _C

    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="count \\* \\(3K-1\\)"):
        _C.rq_spline_rows_forward(x.numpy(), torch.zeros(3, 9).numpy(), x.clone().numpy(), torch.zeros(3).numpy(), 2, 1.0,
                                  False, 0.5)


def _with_nans(num_bins: int, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elements with a NaN input, or with a NaN raw width or height (each position) or NaN raw derivatives (only the
    bin's own knots count), inside and in the tails (x = 5), beside clean elements; returns x, params and which
    elements must come out NaN."""
    n = 2 * num_bins + 1
    x, params = (t.detach().clone() for t in _inputs((2 * n + 4,), num_bins, dtype, scale=0.5))
    x[:n], x[n : 2 * n] = 0.3, 5.0  # inside, in the tails
    for j in range(2 * num_bins):
        params[j, j] = params[n + j, j] = float("nan")
    params[n - 1, 2 * num_bins :] = params[2 * n - 1, 2 * num_bins :] = float("nan")
    x[2 * n] = x[2 * n + 1] = float("nan")
    nan = torch.zeros(len(x), dtype=torch.bool)
    nan[:n] = nan[2 * n : 2 * n + 2] = True  # NaN parameters leave the tails' identity alone
    return x, params, nan


def _assert_nans_propagate(out, ladj, x, nan, what):
    assert out[nan].isnan().all() and ladj[nan].isnan().all(), what
    assert out[~nan].isfinite().all() and ladj[~nan].isfinite().all(), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("num_bins", [2, 5])
def test_nans_reach_the_outputs_and_log_determinants(dtype, inverse, num_bins):
    """A NaN input, or a NaN among an element's spline parameters, makes that element's value and log-det NaN on
    the reference and every instruction set (the vectorized exp clamped NaN to e^-700 and the range test sent NaN to
    the identity tails: finite log-dets such as 89); other elements are untouched."""
    from fastflow import _C
    from fastflow.ops.spline import DERIVATIVE_SHIFT

    x, params, nan = _with_nans(num_bins, dtype)
    expected_out, expected_ladj = rq_spline_ref(x, params, bound=2.0, inverse=inverse)
    _assert_nans_propagate(expected_out, expected_ladj, x, nan, "reference")
    for isa in _isas():
        out, ladj = torch.empty_like(x), torch.empty_like(x)
        _C.rq_spline_forward(x.numpy(), params.numpy(), out.numpy(), ladj.numpy(), 2.0, inverse, DERIVATIVE_SHIFT, isa)
        _assert_nans_propagate(out, ladj, x, nan, isa)
        torch.testing.assert_close(out[~nan], expected_out[~nan])


@pytest.mark.triton
@pytest.mark.parametrize("inverse", [False, True])
def test_triton_spline_propagates_nans(inverse):
    device = _triton_device()
    x, params, nan = _with_nans(5, torch.float32)
    out, ladj = rq_spline(x.to(device), params.to(device), bound=2.0, inverse=inverse, backend="triton")
    _assert_nans_propagate(out.cpu(), ladj.cpu(), x, nan, "triton")


@pytest.mark.parametrize("inverse", [False, True])
def test_a_nan_input_gets_a_nan_gradient_on_every_backend(inverse):
    """The reference's clamp gave a NaN input the gradient 0 where the native kernel gives NaN."""
    params = torch.randn(2, 3 * 5 - 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for backend in ("reference", "native"):
        x = torch.tensor([float("nan"), 0.3], dtype=torch.float64, requires_grad=True)
        out, ladj = rq_spline(x, params, bound=2.0, inverse=inverse, backend=backend)
        (grad,) = torch.autograd.grad((out + ladj).sum(), x)
        assert grad[0].isnan() and grad[1].isfinite(), (backend, grad)


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


@pytest.mark.parametrize("backend, dtype, raw", [("native", torch.float64, 1e15), ("native", torch.float32, 1e6),
                                                pytest.param("triton", torch.float32, 1e6, marks=pytest.mark.triton)])
def test_inverse_width_gradients_of_huge_derivatives_stay_right(backend, dtype, raw):
    """The inverse's g_t came from two terms g_l·ladj_dt of size ~1/t that cancel: with a huge interior derivative the
    width gradients drifted (native float64 at 1e15: 1.4e-2 relative, float32 at 1e6: 1.5e-3) while the reference
    and nflows agreed; x = X + W t with t free of X gives g_t = -grad_out W exactly."""
    num_bins = 4
    params = torch.randn(10, 3 * num_bins - 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))[9:]
    params[0, 2 * num_bins] = raw
    x = torch.tensor([0.5], dtype=torch.float64)
    device = _triton_device() if backend == "triton" else "cpu"

    def width_gradients(spline, dtype, **options):
        inputs = tuple(t.to(device, dtype).requires_grad_() for t in (x, params))
        out, ladj = spline(*inputs, bound=2.0, inverse=True, **options)
        return torch.autograd.grad((out + ladj).sum(), inputs[1])[0][0, :num_bins].double().cpu()

    truth = width_gradients(rq_spline_ref, torch.float64)
    error = (width_gradients(rq_spline, dtype, backend=backend) - truth).abs().max() / truth.abs().max()
    assert error < (1e-12 if dtype == torch.float64 else 1e-5), error


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="3K-1"):
        rq_spline(torch.zeros(4), torch.zeros(4, 4), bound=1.0)
    with pytest.raises(TypeError, match="float64"):
        rq_spline(torch.zeros(4), torch.zeros(4, 5, dtype=torch.float64), bound=1.0)
    with pytest.raises(RuntimeError, match="native kernels take float32/float64"):
        rq_spline(torch.zeros(4, dtype=torch.float16), torch.zeros(4, 5, dtype=torch.float16), bound=1.0, backend="native")
    # more bins than fit their minimum sizes in [-B, B] (no bijection: backends disagreed), a bound that made the
    # spline the identity (<= 0) or NaN (inf), and integers (a bare torch error) are refused
    with pytest.raises(ValueError, match="num_bins must be at most 999"):
        rq_spline(torch.zeros(4), torch.zeros(4, 3 * 1500 - 1), bound=3.0)
    for bound in (0.0, -3.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="bound"):
            rq_spline(torch.zeros(4), torch.zeros(4, 5), bound=bound)
    with pytest.raises(TypeError, match="float16/bfloat16/float32/float64"):
        rq_spline(torch.zeros(4, dtype=torch.long), torch.zeros(4, 5, dtype=torch.long), bound=1.0)
    with pytest.raises(RuntimeError, match="at most 128 bins"):
        rq_spline(torch.zeros(4), torch.zeros(4, 3 * 130 - 1), bound=1.0, backend="native")


def test_native_spline_is_a_custom_op_to_a_dispatch_mode_and_a_direct_call_otherwise():
    """Eager calls of the native spline skip its custom ops' dispatch (`ops.autograd.traced`); under a dispatch mode
    (make_fx, fake tensors, FlopCounterMode) it runs as the custom ops, forward and backward, which a trace records,
    and gives the eager values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, params = _inputs((8, 3), 4, torch.float32, seed=5)

    def run():
        leaves = x.clone().requires_grad_(), params.clone().requires_grad_()
        out, ladj = rq_spline(*leaves, bound=2.0, backend="native")
        return out, ladj, torch.autograd.grad(out.square().sum() + ladj.sum(), leaves)

    seen = []
    eager = run()
    assert not seen
    with Record():
        watched = run()
    assert {"fastflow.rq_spline.default", "fastflow.rq_spline_backward.default"} <= set(seen)
    torch.testing.assert_close(watched, eager, rtol=0, atol=0)
