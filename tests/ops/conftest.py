"""Fixtures of the coupling-op tests."""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def backend_pair():
    """`pair(make, scale)`: (reference, triton) copies of the module `make(backend)` on the test device, its
    parameters moved by scale·N(0, 1) off their initial values (the last conditioner layers start at zero:
    identity layers would hide errors)."""

    def pair(make, scale: float = 0.2):
        reference = make("reference").to(DEVICE)
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(scale * torch.randn_like(p))
        fused = make("triton").to(DEVICE)
        fused.load_state_dict(reference.state_dict())
        return reference, fused

    return pair


@pytest.fixture
def fused_fp32(monkeypatch):
    """The fused coupling kernels for fp32 products on CUDA too, where dispatch would run the conditioner in torch
    (`fastflow.ops.coupling.fuses_conditioner`): tests of the fused kernels compare them at fp32 tolerance."""
    from fastflow.ops import coupling

    monkeypatch.setattr(coupling, "fuses_conditioner", lambda precision, device: True)


@pytest.fixture(autouse=True)
def fused_backward_on_cuda(monkeypatch):
    """The fused coupling backward on CUDA too (opt-in there, `fastflow.ops.coupling_flow.trains_fused`), so that
    GPU runs of these tests check its kernel as CPU runs (the interpreter) do."""
    monkeypatch.setenv("FASTFLOW_FUSED_BACKWARD", "1")
