"""Drop-in layers: one state_dict, the same numbers on every backend; clear errors when forced wrong."""

import pytest
import torch

from fastflow.backends import backends
from fastflow.flows import FlowConfig
from fastflow.nn import AffineCoupling, CouplingFlow, SplineCoupling
from fastflow.nn.coupling import MLP

native_missing = not backends()["native"].available


@pytest.mark.skipif(native_missing, reason="fastflow._C is not built")
@pytest.mark.parametrize("dim, context_dim", [(3, 2), (2, 0), (5, 4)])
def test_coupling_flow_state_dict_is_shared_across_backends(dim, context_dim):
    config = FlowConfig(num_layers=3, num_bins=6, hidden=32)
    reference = CouplingFlow(dim, context_dim, config=config, backend="reference")
    native = CouplingFlow(dim, context_dim, config=config, backend="native")
    native.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    native.load_state_dict(reference.state_dict())
    theta = 2 * torch.randn(64, dim)  # reaches the spline tails
    context = torch.randn(64, context_dim) if context_dim else None
    torch.testing.assert_close(native.log_prob(theta, context), reference.log_prob(theta, context), atol=1e-4, rtol=1e-4)
    loss_native = -native.log_prob(theta, context).mean()
    loss_reference = -reference.log_prob(theta, context).mean()
    grads_native = torch.autograd.grad(loss_native, list(native.parameters()))
    grads_reference = torch.autograd.grad(loss_reference, list(reference.parameters()))
    for g, g_ref in zip(grads_native, grads_reference):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-3)


def test_layers_work_inside_a_user_model():
    layer = SplineCoupling(4, 0, num_bins=5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    x = torch.randn(8, 4)
    y, ladj = layer(model(x))
    assert y.shape == (8, 4) and ladj.shape == (8,)
    (y.sum() + ladj.sum()).backward()
    assert model[0].weight.grad is not None


def test_forcing_an_unimplemented_backend_raises():
    layer = AffineCoupling(4, 0, backend="native").to(torch.bfloat16)  # native runs float32/float64 only
    with pytest.raises(RuntimeError, match="does not implement"):
        layer(torch.randn(3, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unknown backend"):
        SplineCoupling(4, 0, backend="cuda-magic")(torch.randn(3, 4))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_replaced_conditioner_parameter_is_used(backend, monkeypatch):
    """The layers read their weights from the conditioner's parameter dicts on every call (runs of layers cache
    where to read them, not the tensors): a parameter assigned anew, or moved with `.to`, is the one used."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    flow = CouplingFlow(3, config=FlowConfig(transform="affine", num_layers=2, hidden=16), backend=backend)
    x = torch.randn(5, 3)
    with torch.no_grad():
        before = flow.log_prob(x)
        last = flow.transforms[0].conditioner[-1]
        last.bias = torch.nn.Parameter(last.bias + 0.5)  # a new tensor, not an in-place change
        after = flow.log_prob(x)
        flow.to(torch.float64).to(torch.float32)
        moved = flow.log_prob(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(moved, after)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_conditioner_keeps_its_layers(backend, monkeypatch):
    """The coupling ops compute the conditioner from its Linear layers' parameters: a layer swapped in would be
    ignored (it was, silently), so adding, replacing or removing layers raises."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = AffineCoupling(4, backend=backend)
    for change in (lambda m: m.__setitem__(-1, torch.nn.Linear(64, 4)), lambda m: m.append(torch.nn.Tanh()),
                   lambda m: m.__delitem__(1), lambda m: m.insert(0, torch.nn.Identity()),
                   lambda m: setattr(m, "extra", torch.nn.Linear(2, 2))):
        with pytest.raises(TypeError, match="fixed at construction"):
            change(layer.conditioner)
    assert len(layer.conditioner) == 5
    torch.nn.utils.parametrizations.weight_norm(layer.conditioner[0])
    with pytest.raises(RuntimeError, match="parametrizations"):
        layer(torch.randn(3, 4))


def test_a_layers_conditioner_and_options_are_fixed():
    """A conditioner or option assigned after construction was ignored (the parameter slots and the fused runs
    keep what the layer was built with; the Triton spline took the old bound, the reference the new one)."""
    affine, spline = AffineCoupling(4, hidden=16), SplineCoupling(4, hidden=16)
    for layer, name, value in ((affine, "conditioner", MLP(2, 4, hidden=16)), (affine, "scale_bound", 2.0),
                               (spline, "bound", 1.0), (spline, "num_bins", 4), (spline, "dim", 5)):
        with pytest.raises(AttributeError, match=f"{name} is fixed at construction"):
            setattr(layer, name, value)
    spline.backend = "reference"  # (the backend may change: runs are rebuilt for it)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_conditioner_weights_of_another_shape(backend, monkeypatch):
    """Parameters assigned anew with another width: the reference computes with them as given; a run of fused layers
    was built for the old shapes and read the new weights at the old offsets (spline outputs 1.97 off): it raises."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = SplineCoupling(3, hidden=16, backend=backend)
    x = torch.randn(5, 3)
    layer(x)  # (builds the layer's run on the Triton backend)
    wider = MLP(1, layer.conditioner[-1].out_features, hidden=32)
    for index in (0, 2, 4):  # (the Linear layers)
        layer.conditioner[index].weight, layer.conditioner[index].bias = wider[index].weight, wider[index].bias
    if backend == "reference":
        assert layer(x)[0].shape == (5, 3)
    else:
        with pytest.raises(ValueError, match="changed shape after it was built"):
            layer(x)


def test_a_flipped_one_dimensional_layer_is_refused():
    with pytest.raises(ValueError, match="transform no coordinate"):
        AffineCoupling(1, flip=True)
    flow = CouplingFlow(1, 2, config=FlowConfig(permutation="lu", num_layers=4))
    assert all(not t.flip for t in flow.transforms if hasattr(t, "flip"))


@pytest.mark.parametrize("backend", [None, "native", "reference", "triton"])
def test_second_derivatives_are_exact_or_refused(backend, monkeypatch):
    """The fused kernels' gradients are first order: a Hessian through them raises (it came back wrong, or zero,
    without a word); an affine flow on CPU runs torch under autograd on every backend, so its Hessian is the
    Hessian of its log-density."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    flow = _perturbed(CouplingFlow(2, config=FlowConfig(transform="affine", num_layers=2, hidden=8), backend=backend))
    if backend != "triton":
        flow = flow.double()
    point = torch.tensor([0.3, -0.7], dtype=torch.float32 if backend == "triton" else torch.float64)

    def log_q(t):
        return flow.log_prob(t[None])[0]

    if backend == "triton":
        with pytest.raises(RuntimeError, match="first order only"):
            torch.autograd.functional.hessian(log_q, point)
        return
    hessian = torch.autograd.functional.hessian(log_q, point)
    step = 1e-5
    by_differences = torch.stack([
        (torch.autograd.functional.jacobian(log_q, point + step * e) - torch.autograd.functional.jacobian(log_q, point - step * e))
        / (2 * step) for e in torch.eye(2, dtype=point.dtype)])
    torch.testing.assert_close(hessian, by_differences, atol=1e-6, rtol=1e-6)


def test_a_bare_native_spline_layer_refuses_second_derivatives_by_name():
    """Without hidden layers only the native spline op is fused: its backward gave torch's "no autograd formula"."""
    layer = SplineCoupling(2, depth=0, num_bins=4, backend="native").double()
    x = torch.tensor([[0.3, -0.7]], dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="first order only"):
        torch.autograd.grad(layer(x)[1].sum(), x, create_graph=True)


def test_triton_runs_read_permutations_loaded_later(monkeypatch):
    """A fused run keeps its column maps on the device: `load_state_dict` writes the permutations in place after the
    first call, and the run must use the new ones."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    source = _perturbed(CouplingFlow(6, config=FlowConfig(transform="affine", permutation="random", seed=0, hidden=8),
                                     backend="reference"))
    target = CouplingFlow(6, config=FlowConfig(transform="affine", permutation="random", seed=7, hidden=8), backend="triton")
    x = torch.randn(5, 6)
    with torch.no_grad():
        target.log_prob(x)
        target.load_state_dict(source.state_dict())
        torch.testing.assert_close(target.log_prob(x), source.log_prob(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("depth", [1, 5])
def test_triton_layers_of_other_depths(depth, monkeypatch):
    """The fused kernels take two hidden layers; other depths run the reference conditioner (depth 5's twelve
    tensors were taken for two layers' six, and the kernel launch failed)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = _perturbed(AffineCoupling(5, 3, depth=depth, backend="triton"))
    reference = AffineCoupling(5, 3, depth=depth, backend="reference")
    reference.load_state_dict(layer.state_dict())
    x, context = torch.randn(9, 5), torch.randn(9, 3)
    with torch.no_grad():
        if depth == 5:
            with pytest.raises(RuntimeError, match="two hidden layers"):
                layer(x, context)
        for backend in ("auto", None):
            layer.backend = backend
            torch.testing.assert_close(layer(x, context), reference(x, context))


def test_splines_beyond_the_native_bin_limit_run_the_reference():
    from fastflow.ops.spline import NATIVE_MAX_BINS

    layer = _perturbed(SplineCoupling(2, num_bins=NATIVE_MAX_BINS + 1))
    reference = SplineCoupling(2, num_bins=NATIVE_MAX_BINS + 1, backend="reference")
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(7, 2)
    torch.testing.assert_close(layer(x), reference(x))
    if not native_missing:
        with pytest.raises(RuntimeError, match="does not implement"):
            SplineCoupling(2, num_bins=NATIVE_MAX_BINS + 1, backend="native")(x)
        SplineCoupling(2, num_bins=NATIVE_MAX_BINS, backend="native")(x)  # the limit itself runs natively


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batches_with_a_context(backend, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    flow = CouplingFlow(3, 2, config=FlowConfig(num_layers=2, hidden=8), backend=backend)
    assert flow.log_prob(torch.empty(0, 3), torch.empty(0, 2)).shape == (0,)
    assert flow.sample(4, torch.empty(0, 2)).shape == (4, 0, 3)


def _perturbed(layer: torch.nn.Module) -> torch.nn.Module:
    """The layer with every parameter moved off its initial value (a fresh coupling layer is the identity)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return layer


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("layer_type", [AffineCoupling, SplineCoupling])
def test_layers_take_any_batch_shape(layer_type, backend, monkeypatch):
    """As zuko's transforms: x `(*, dim)` with a context of the same batch shape, one row `(dim,)` included."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = _perturbed(layer_type(5, 3, hidden=16, backend=backend))
    x, context = 2 * torch.randn(2, 4, 5), torch.randn(2, 4, 3)
    for transform in (layer, layer.inverse):
        y, ladj = transform(x, context)
        rows_y, rows_ladj = transform(x.reshape(8, 5), context.reshape(8, 3))
        assert y.shape == (2, 4, 5) and ladj.shape == (2, 4)
        torch.testing.assert_close(y.reshape(8, 5), rows_y)
        torch.testing.assert_close(ladj.reshape(8), rows_ladj)
        one_y, one_ladj = transform(x[1, 2], context[1, 2])
        assert one_y.shape == (5,) and one_ladj.shape == ()
        torch.testing.assert_close(one_y, rows_y[6])
        assert not torch.allclose(rows_y, x.reshape(8, 5))  # (the layer is not the identity)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("layer_type", [AffineCoupling, SplineCoupling])
def test_a_nan_reaches_its_rows_outputs_and_log_determinant(layer_type, backend, monkeypatch):
    """A NaN in a kept coordinate (the conditioner's input) or, for splines, in a changed one makes the row's
    log-det NaN, on every backend and in fused runs of layers (the native spline turned it into a finite 89, and a
    NaN input took the spline's identity tails with log-det 0); the other rows are untouched."""
    if backend == "native" and native_missing:
        pytest.skip("fastflow._C is not built")
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = _perturbed(layer_type(4, hidden=16, backend=backend))
    kept_first, _, changed_first, changed_count = layer.fused_layout()
    changed = slice(changed_first, changed_first + changed_count)
    x = torch.randn(5, 4)
    x[1, kept_first] = x[2, changed_first] = float("nan")
    nan_ladj = torch.tensor([False, True, layer_type is SplineCoupling, False, False])
    for transform in (layer, layer.inverse):
        y, ladj = transform(x)
        clean_y, clean_ladj = transform(x[[0, 3, 4]])
        assert y[1, changed].isnan().all() and y[1, kept_first].isnan() and y[2, changed_first].isnan()
        assert torch.equal(ladj.isnan(), nan_ladj)
        torch.testing.assert_close(y[[0, 3, 4]], clean_y)
        torch.testing.assert_close(ladj[[0, 3, 4]], clean_ladj)
    flow = _perturbed(CouplingFlow(4, config=FlowConfig(transform="affine" if layer_type is AffineCoupling else "spline",
                                                        num_layers=3, hidden=16), backend=backend))
    with torch.no_grad():
        log_prob = flow.log_prob(x)
    assert log_prob[1:3].isnan().all() and log_prob[[0, 3, 4]].isfinite().all()


@pytest.mark.parametrize("options, message", [
    (dict(dim=2.5), "dim"), (dict(context_dim=-1), "context_dim"), (dict(hidden=32.0), "hidden"),
    (dict(depth=-1), "depth"), (dict(scale_bound=-1.0), "scale_bound"), (dict(scale_bound=float("nan")), "scale_bound"),
    (dict(num_bins=0), "num_bins"), (dict(num_bins=2.5), "num_bins"), (dict(bound=-1.0), "bound"),
    (dict(bound=float("nan")), "bound"), (dict(backend="bogus"), "unknown backend 'bogus'")])
def test_layers_refuse_bad_settings_clearly(options, message):
    """A negative spline bound made the layer the identity and a negative context_dim built a layer; NaN bounds gave NaN
    everywhere; fractional sizes failed in torch.empty."""
    layer_type = SplineCoupling if {"num_bins", "bound"} & options.keys() else AffineCoupling
    arguments = {"dim": 3, **options}
    with pytest.raises(ValueError, match=message):
        layer_type(arguments.pop("dim"), **arguments)


@pytest.mark.parametrize("layer_type", [AffineCoupling, SplineCoupling])
def test_layers_refuse_bad_inputs_clearly(layer_type):
    layer = _perturbed(layer_type(5, 3, hidden=16))
    x, context = torch.randn(7, 5), torch.randn(7, 3)
    name = layer_type.__name__
    with pytest.raises(ValueError, match=rf"{name}: x must be \(\*, 5\), got \(7, 4\)"):
        layer(torch.randn(7, 4), context)
    with pytest.raises(ValueError, match=f"{name}: this layer needs a context of dim 3"):
        layer(x)
    for bad in (torch.randn(6, 3), torch.randn(7, 2), torch.randn(7, 1, 3)):
        with pytest.raises(ValueError, match=rf"{name}: context must be \(\*, 3\) with x's batch shape \(7,\)"):
            layer(x, bad)
    with pytest.raises(ValueError, match=f"{name}: x is torch.float64 but the layer's parameters are torch.float32"):
        layer(x.double(), context)
    # a context of another dtype is cast to the layer's (as the flows' contexts are: integer observations too)
    torch.testing.assert_close(layer(x, context.double()), layer(x, context))
    torch.testing.assert_close(layer(x, context.round().long()), layer(x, context.round()))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_flow_casts_its_context_to_its_dtype(backend, monkeypatch):
    """(On the Triton backend a float64 context used to make the run's dtypes mixed, which it cannot fuse.)"""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    flow = _perturbed(CouplingFlow(3, 2, config=FlowConfig(transform="affine", num_layers=2, hidden=16), backend=backend))
    theta, context = torch.randn(6, 3), torch.randn(6, 2)
    torch.testing.assert_close(flow.log_prob(theta, context.double()), flow.log_prob(theta, context))
    torch.testing.assert_close(flow.log_prob(theta, context.round().long()), flow.log_prob(theta, context.round()))
    with torch.no_grad():
        torch.manual_seed(1)
        draws = flow.sample(4, context.double())
        torch.manual_seed(1)
        torch.testing.assert_close(draws, flow.sample(4, context))
    assert draws.dtype == torch.float32


@pytest.mark.skipif(native_missing, reason="fastflow._C is not built")
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("transform", ["spline", "affine"])
def test_a_training_loss_compiles_into_one_graph(transform, backend):
    """torch.compile(fullgraph=True) of a loss through a coupling flow on the CPU backends, from the flow's first
    call: the native kernels are custom ops with fake kernels, and dispatch reads the backends' status and the flow's
    runs of layers (both built with the flow) as constants; the same loss and gradients as eager."""
    flow = _perturbed(CouplingFlow(3, 2, config=FlowConfig(transform=transform, num_layers=2, hidden=16, num_bins=5),
                                   backend=backend))
    theta, context = 2 * torch.randn(64, 3), torch.randn(64, 2)
    parameters = list(flow.parameters())

    def loss():
        return -flow.log_prob(theta, context).mean()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")()  # (tracing, fake kernels, no codegen)
        compiled_grads = torch.autograd.grad(compiled, parameters)
    finally:
        torch._dynamo.reset()
    eager = loss()
    torch.testing.assert_close(compiled, eager)
    for g, g_eager in zip(compiled_grads, torch.autograd.grad(eager, parameters)):
        torch.testing.assert_close(g, g_eager)


@pytest.mark.parametrize("backend", [None, "reference", "native"])
@pytest.mark.parametrize("layer_type", [AffineCoupling, SplineCoupling])
def test_inputs_on_another_non_cuda_device_or_of_mixed_dtypes_are_refused(layer_type, backend):
    """The device check compared get_device(), -1 for CPU and meta alike: a meta x or context passed it and failed
    in torch, or blamed the backend; the functional op took mixed dtypes to pybind11 (native) or promoted them."""
    from fastflow.ops.coupling import affine_coupling

    layer = layer_type(5, 3, hidden=16, backend=backend)
    x, context = torch.randn(7, 5), torch.randn(7, 3)
    with pytest.raises(ValueError, match="x is on meta but the layer's parameters on cpu"):
        layer(x.to("meta"), context)
    with pytest.raises(ValueError, match="context is on meta but the layer's parameters on cpu"):
        layer(x, context.to("meta"))
    weights = [p.detach() for p in AffineCoupling(4, 3, hidden=8).conditioner.parameters()]
    with pytest.raises(ValueError, match="inputs and weights must be on one device"):
        affine_coupling(x[:, :2], context.to("meta"), x[:, 2:4], weights, scale_bound=3.0, inverse=False, backend=backend)
    with pytest.raises(ValueError, match="inputs and weights must share one dtype"):  # (pybind11's TypeError on native)
        affine_coupling(x[:, :2], context, x[:, 2:4].double(), weights, scale_bound=3.0, inverse=False, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("layer_type", [AffineCoupling, SplineCoupling])
def test_layers_refuse_inputs_on_another_device(layer_type):
    layer = layer_type(5, 3, hidden=16)  # on the CPU
    x, context = torch.randn(7, 5), torch.randn(7, 3)
    with pytest.raises(ValueError, match="x is on cuda:0 but the layer's parameters on cpu"):
        layer(x.cuda(), context)
    with pytest.raises(ValueError, match="context is on cuda:0 but the layer's parameters on cpu"):
        layer(x, context.cuda())


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_layers_and_flows_run_in_their_dtype_under_autocast(backend, monkeypatch):
    """Under a bf16 autocast (a mixed-precision loss around a flow) the conditioner's bf16 outputs reached the native
    op (TypeError: unsupported ScalarType BFloat16): layers and flows run in their parameters' dtype inside."""
    if backend == "native" and native_missing:
        pytest.skip("fastflow._C is not built")
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    flow = CouplingFlow(3, 2, config=FlowConfig(num_layers=2, hidden=16, num_bins=5), backend=backend)
    layer = _perturbed(SplineCoupling(3, 2, num_bins=5, backend=backend))
    _perturbed(flow)
    x, context = torch.randn(6, 3), torch.randn(6, 2)
    expected = flow.log_prob(x, context), layer(x, context)
    torch.manual_seed(0)
    expected_draws = flow.sample(4, context[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_q, (y, ladj) = flow.log_prob(x, context), layer(x, context)
        torch.manual_seed(0)
        draws = flow.sample(4, context[:2])
        log_q.sum().backward()  # (gradients under autocast too)
    torch.testing.assert_close(log_q, expected[0])
    torch.testing.assert_close((y, ladj), expected[1])
    torch.testing.assert_close(draws, expected_draws)


def test_layers_refuse_complex_contexts():
    """The cast to x's dtype dropped the imaginary parts (torch only warned)."""
    for layer in (AffineCoupling(4, 2), SplineCoupling(4, 2)):
        with pytest.raises(TypeError, match="context must be real"):
            layer(torch.randn(3, 4), torch.ones(3, 2) * (1 + 1j))
