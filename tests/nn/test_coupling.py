"""Drop-in layers: one state_dict, the same numbers on every backend; clear errors when forced wrong."""

import pytest
import torch

from fastflow.backends import backends
from fastflow.flows import FlowConfig
from fastflow.nn import AffineCoupling, CouplingFlow, SplineCoupling

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
