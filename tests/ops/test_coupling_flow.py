"""Fused runs of coupling layers (`fastflow.ops.coupling_flow`, `kernels.coupling.coupling_flow_triton`): a flow
on the Triton backend runs its consecutive coupling layers and the permutations between them in one launch
without autograd, and one layer at a time otherwise; against the reference flow with the same state_dict.
Compiled on CUDA when a GPU is visible, else under TRITON_INTERPRET=1 (tests/conftest.py).

Tolerances: fp32 products, summed in another order than torch.mm, then up to 3 layers of exp(±3) scales:
2e-4 relative (the values reach ~1e3).
"""

import copy

import pytest
import torch

from fastflow.backends import backends
from fastflow.flows import Flow, FlowConfig, build_flow
from fastflow.flows.bases import StandardNormal
from fastflow.flows.transforms import LULinear, ReversePermutation, Standardize
from fastflow.nn import AffineCoupling, CouplingFlow, SplineCoupling
from fastflow.ops.coupling_flow import CouplingRun

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not backends()["triton"].available, reason=backends()["triton"].reason),
]
ATOL, RTOL = 2e-4, 2e-4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _coupling_flow(transform, dim, context, permutation, layers=3):
    config = FlowConfig(transform=transform, num_layers=layers, hidden=32, num_bins=6, permutation=permutation)
    return lambda backend: CouplingFlow(dim, context, config=config, backend=backend)


FLOWS = [("affine", 5, 3, "reverse"), ("affine", 4, 0, "random"), ("affine", 3, 2, "lu"),
         ("spline", 5, 3, "random"), ("spline", 3, 0, "reverse"), ("spline", 2, 2, "lu"), ("spline", 1, 0, "reverse")]


def _kernel_launches(monkeypatch) -> dict:
    """Counts launches of the Triton coupling kernels by name from now on (the launches still run)."""
    from fastflow.kernels import coupling

    counts = {}

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            counts[self.name] = counts.get(self.name, 0) + 1
            return self.kernel[grid]

    for name in ("_coupling_flow_kernel", "_affine_coupling_kernel", "_spline_coupling_kernel"):
        monkeypatch.setattr(coupling, name, Counting(name, getattr(coupling, name)))
    return counts


@pytest.mark.parametrize("transform, dim, context, permutation", FLOWS)
def test_fused_flow_matches_the_reference_in_one_launch_per_run(transform, dim, context, permutation, monkeypatch,
                                                                backend_pair, fused_fp32):
    reference, fused = backend_pair(_coupling_flow(transform, dim, context, permutation))
    x = 2.0 * torch.randn(70, dim, device=DEVICE)  # 70 rows: not a multiple of the row block; some in the tails
    contexts = torch.randn(70, context, device=DEVICE) if context else None
    shared = torch.randn(context, device=DEVICE) if context else None
    batch = torch.randn(3, context, device=DEVICE) if context else None
    launches = _kernel_launches(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(fused.log_prob(x, contexts), reference.log_prob(x, contexts), atol=ATOL, rtol=RTOL)
        if context:
            torch.testing.assert_close(fused.log_prob(x, shared), reference.log_prob(x, shared), atol=ATOL, rtol=RTOL)
    runs = 1 if permutation != "lu" else 3  # LU layers between the coupling layers split the runs
    assert launches == {"_coupling_flow_kernel": runs * (2 if context else 1)}
    for condition in ((shared, batch) if context else (None,)):
        torch.manual_seed(1)
        draws, log_q = fused.sample_and_log_prob(50, condition)
        torch.manual_seed(1)
        draws_ref, log_q_ref = reference.sample_and_log_prob(50, condition)
        torch.testing.assert_close(draws, draws_ref, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(log_q, log_q_ref, atol=ATOL, rtol=RTOL)


def test_runs_take_the_couplings_and_the_permutation_after_each():
    dim = 4
    couplings = [AffineCoupling(dim, hidden=16, backend="triton"), AffineCoupling(dim, hidden=16, backend="triton"),
                 SplineCoupling(dim, hidden=16, backend="triton"), AffineCoupling(dim, hidden=16, backend="triton")]
    permutations = [ReversePermutation(dim) for _ in range(3)]
    standardize, lu = Standardize(torch.zeros(dim), torch.ones(dim)), LULinear(dim)
    flow = Flow([standardize, couplings[0], permutations[0], couplings[1], permutations[1], couplings[2], lu,
                 permutations[2], couplings[3]], StandardNormal(dim))
    forward = flow._chain(inverse=False)
    assert forward[0] is standardize and forward[3] is lu and forward[4] is permutations[2]
    assert [type(step) for step in forward] == [Standardize, CouplingRun, CouplingRun, LULinear, ReversePermutation, CouplingRun]
    assert forward[1].steps == [(couplings[0], permutations[0]), (couplings[1], permutations[1])]  # one kind per run
    assert forward[2].steps == [(couplings[2], None)]
    backward = flow._chain(inverse=True)
    assert backward[0].steps == [(couplings[3], permutations[2])] and backward[0].inverse
    assert backward[1] == lu.inverse and backward[-1] == standardize.inverse
    assert backward[3].steps == [(couplings[1], permutations[0]), (couplings[0], None)]


def test_changing_a_layer_backend_rebuilds_the_runs():
    flow = CouplingFlow(4, config=FlowConfig(transform="affine", num_layers=3, hidden=16), backend="triton")
    (run,) = flow._chain(inverse=False)
    flow.transforms[2].backend = "reference"  # the middle coupling layer (transforms alternate with permutations)
    first, second, third = flow._chain(inverse=False)
    assert run not in (first, second, third) and second.backend == "reference"
    assert first.steps[0][0] is flow.transforms[0] and third.steps[0][0] is flow.transforms[4]


def test_mixed_flow_with_preprocessing_matches_the_reference(backend_pair, fused_fp32):
    def make(backend):
        dim = 3
        transforms = [Standardize(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 0.5, 1.0])),
                      SplineCoupling(dim, 2, hidden=16, num_bins=4, backend=backend), ReversePermutation(dim),
                      AffineCoupling(dim, 2, hidden=16, flip=True, backend=backend), ReversePermutation(dim),
                      AffineCoupling(dim, 2, hidden=16, backend=backend)]
        return Flow(transforms, StandardNormal(dim), context_dim=2)

    reference, fused = backend_pair(make)
    x, context = torch.randn(40, 3, device=DEVICE), torch.randn(40, 2, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fused.log_prob(x, context), reference.log_prob(x, context), atol=ATOL, rtol=RTOL)
        torch.manual_seed(2)
        draws = fused.sample(30, context[0])
        torch.manual_seed(2)
        torch.testing.assert_close(draws, reference.sample(30, context[0]), atol=ATOL, rtol=RTOL)


def _kernel_names(monkeypatch) -> dict:
    """`_kernel_launches` over the affine step kernels, the fused affine backward and the elementwise spline kernels
    too."""
    from fastflow.kernels import affine, coupling_backward, spline

    counts = _kernel_launches(monkeypatch)
    for module, names in ((affine, ("_affine_step_forward_kernel", "_affine_step_backward_kernel")),
                          (coupling_backward, ("_coupling_flow_backward_kernel",)),
                          (spline, ("_rq_forward_kernel", "_rq_backward_kernel", "_spline_step_forward_kernel"))):
        for name in names:
            kernel = getattr(module, name)

            class Counting:
                def __getitem__(self, grid, name=name, kernel=kernel):
                    counts[name] = counts.get(name, 0) + 1
                    return kernel[grid]

            monkeypatch.setattr(module, name, Counting())
    return counts


def _assert_gradients_close(grads, grads_ref):
    for g, g_ref in zip(grads, grads_ref):  # (1-D flows: the conditioners take no input, their w1 is empty)
        torch.testing.assert_close(g.to(g_ref.dtype), g_ref, atol=1e-4 * g_ref.abs().amax().item() if g_ref.numel() else 0.0, rtol=1e-6)


@pytest.mark.parametrize("transform, dim, context, permutation, fused_training", [
    ("affine", 5, 3, "reverse", True), ("affine", 4, 0, "random", True), ("affine", 1, 2, "reverse", True),
    ("affine", 5, 3, "reverse", False), ("affine", 4, 0, "random", False), ("affine", 1, 0, "reverse", False),
    ("spline", 4, 2, "reverse", True), ("spline", 5, 0, "random", True), ("spline", 1, 2, "reverse", True),
    ("spline", 4, 2, "reverse", False)])
def test_under_autograd_values_and_gradients_match_the_reference(transform, dim, context, permutation, fused_training,
                                                                 monkeypatch, backend_pair):
    """Training on the Triton backend: runs in two launches where the conditioners fuse (`_FusedRun`: the fused
    forward keeping its states, `_coupling_flow_backward_kernel`), else (forced here: fp32 products on CUDA) one
    `TritonAffineStep` or `TritonSplineStep` per layer (one kernel each way per layer);
    log_prob, draws and their gradients in the parameters, the inputs and the context against the reference flow.
    Gradients: fp32 products summed in another order through 3 layers, 1e-4 relative to the largest entry (log_prob's
    against the float64 reference flow)."""
    from fastflow.ops import coupling

    monkeypatch.setattr(coupling, "fuses_conditioner", lambda precision, device: fused_training)
    reference, fused = backend_pair(_coupling_flow(transform, dim, context, permutation))
    x = (2.0 * torch.randn(33, dim, device=DEVICE)).requires_grad_()
    contexts = torch.randn(33, context, device=DEVICE, requires_grad=True) if context else None
    leaves = [x] + ([contexts] if context else [])
    launches = _kernel_names(monkeypatch)
    for flow in (fused, reference):
        flow.zero_grad()
    log_prob, log_prob_ref = fused.log_prob(x, contexts), reference.log_prob(x, contexts)
    torch.testing.assert_close(log_prob, log_prob_ref, atol=ATOL, rtol=RTOL)
    cotangent = torch.randn(33, device=DEVICE)
    grads = torch.autograd.grad(log_prob, [*fused.parameters(), *leaves], cotangent)
    # against float64: the float32 reference's own error reaches 0.8e-4 of the largest entry on some CPUs
    exact, exact_leaves = copy.deepcopy(reference).double(), [t.detach().double().requires_grad_() for t in leaves]
    grads_exact = torch.autograd.grad(exact.log_prob(*exact_leaves), [*exact.parameters(), *exact_leaves],
                                      cotangent.double())
    _assert_gradients_close(grads, grads_exact)
    if fused_training:
        assert launches == {"_coupling_flow_kernel": 1, "_coupling_flow_backward_kernel": 1}
    elif transform == "affine":
        assert launches == {"_affine_step_forward_kernel": 3, "_affine_step_backward_kernel": 3}
    else:
        assert launches == {"_spline_step_forward_kernel": 3, "_rq_backward_kernel": 3}
    condition = torch.randn(context, device=DEVICE) if context else None
    torch.manual_seed(1)
    draws, log_q = fused.sample_and_log_prob(20, condition)  # rsample: autograd through the inverse
    torch.manual_seed(1)
    draws_ref, log_q_ref = reference.sample_and_log_prob(20, condition)
    torch.testing.assert_close(draws, draws_ref, atol=ATOL, rtol=RTOL)
    grads = torch.autograd.grad(draws.sum() + log_q.sum(), list(fused.parameters()))
    grads_ref = torch.autograd.grad(draws_ref.sum() + log_q_ref.sum(), list(reference.parameters()))
    _assert_gradients_close(grads, grads_ref)


@pytest.mark.parametrize("transform, budget", [("affine", None), ("affine", 1), ("spline", None), ("spline", 1)])
def test_fused_backward_sums_the_weight_gradients_over_chunks_and_launches(transform, budget, monkeypatch,
                                                                           backend_pair):
    """`kernels.coupling_backward` sums each weight gradient over chunks of rows (here 300 rows in 3 chunks of 128
    rows, the last one partly past the rows) as batched products, within one launch or (a budget below one block of
    rows) in chunks of one block, one launch each; a context shared by every row (read at stride 0) gets the
    gradients of all rows. Against the reference flow (tolerances as under autograd)."""
    from fastflow.kernels import coupling_backward

    monkeypatch.setattr(coupling_backward, "CHUNK_ROWS", 100)
    assert coupling_backward.factor_rows(300, 64, 1) == (128, 3, 3)
    if budget is not None:
        launcher = coupling_backward.coupling_flow_backward_triton
        monkeypatch.setattr(coupling_backward, "coupling_flow_backward_triton",
                            lambda *args, **kwargs: launcher(*args, **kwargs, budget=budget))
    reference, fused = backend_pair(_coupling_flow(transform, 6, 4, "random", layers=4))
    x = (2.0 * torch.randn(300, 6, device=DEVICE)).requires_grad_()
    shared = torch.randn(4, device=DEVICE, requires_grad=True)
    log_prob, log_prob_ref = fused.log_prob(x, shared), reference.log_prob(x, shared)
    torch.testing.assert_close(log_prob, log_prob_ref, atol=ATOL, rtol=RTOL)
    cotangent = torch.randn(300, device=DEVICE)
    kernel_launches = _kernel_names(monkeypatch)
    grads = torch.autograd.grad(log_prob, [*fused.parameters(), x, shared], cotangent)
    grads_ref = torch.autograd.grad(log_prob_ref, [*reference.parameters(), x, shared], cotangent)
    _assert_gradients_close(grads, grads_ref)
    assert kernel_launches == {"_coupling_flow_backward_kernel": 1 if budget is None else 5}  # 5 blocks of 64 rows


@pytest.mark.parametrize("transform, hidden, block_hk", [("affine", 48, 32), ("affine", 32, 32), ("spline", 48, 16)])
def test_fused_backward_takes_the_first_layer_in_chunks(transform, hidden, block_hk, monkeypatch, backend_pair):
    """The backward kernel takes the first hidden layer's units `block_hk` at a time (here 1-4 chunks, the last
    one partly or wholly past the width); gradients against the reference flow (tolerances as under autograd)."""
    from fastflow.kernels import coupling_backward

    launcher = coupling_backward.coupling_flow_backward_triton
    monkeypatch.setattr(coupling_backward, "coupling_flow_backward_triton",
                        lambda *args, **kwargs: launcher(*args, **kwargs, block_hk=block_hk))
    config = FlowConfig(transform=transform, num_layers=2, hidden=hidden, num_bins=5, permutation="random")
    reference, fused = backend_pair(lambda backend: CouplingFlow(5, 2, config=config, backend=backend))
    x = (2.0 * torch.randn(40, 5, device=DEVICE)).requires_grad_()
    contexts = torch.randn(40, 2, device=DEVICE, requires_grad=True)
    cotangent = torch.randn(40, device=DEVICE)
    launches = _kernel_names(monkeypatch)
    grads = torch.autograd.grad(fused.log_prob(x, contexts), [*fused.parameters(), x, contexts], cotangent)
    grads_ref = torch.autograd.grad(reference.log_prob(x, contexts), [*reference.parameters(), x, contexts], cotangent)
    _assert_gradients_close(grads, grads_ref)
    assert launches == {"_coupling_flow_kernel": 1, "_coupling_flow_backward_kernel": 1}


@pytest.mark.parametrize("block_hk", [8, 24])
def test_fused_backward_refuses_a_chunk_that_is_not_a_power_of_two_from_16(block_hk):
    from fastflow.kernels.coupling_backward import coupling_flow_backward_triton

    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="block_hk must be a power of 2 >= 16"):
        coupling_flow_backward_triton(x, x, None, x, x[:, 0], x, x, x, x, n_hidden=16, max_inputs=1, max_changed=1,
                                      inverse=False, context_grad=False, scale_bound=2.0, block_hk=block_hk)


def test_factor_rows_chunk_the_rows_within_the_budget():
    """Chunks of about `CHUNK_ROWS` rows, rounded up to whole blocks, fewer rows where a chunk would pass the budget
    (one block at least); as many chunks per launch as the budget holds (at least one); int32 offsets bound it."""
    from fastflow.kernels.coupling_backward import CHUNK_ROWS, factor_rows

    assert factor_rows(33, 64, 10) == (64, 1, 1)
    assert factor_rows(65_536, 64, 10) == (CHUNK_ROWS, 16, 16)
    assert factor_rows(65_537, 64, 10) == (3904, 17, 17)  # 17 chunks of 3,857 rows, rounded up to 61 blocks
    assert factor_rows(65_536, 128, 10, budget=10 * 4096 * 5) == (CHUNK_ROWS, 16, 5)
    assert factor_rows(65_536, 64, 10, budget=10 * 1000) == (960, 69, 1)  # 960 rows: 15 blocks within the budget
    assert factor_rows(65_536, 64, 10, budget=1) == (64, 1024, 1)
    assert factor_rows(10**9, 64, 10, budget=2**40)[0] * 10 * factor_rows(10**9, 64, 10, budget=2**40)[2] < 2**31
    with pytest.raises(ValueError, match="int32"):
        factor_rows(100, 64, 2**26)


@pytest.mark.parametrize("transform", ["affine", "spline"])
def test_wide_runs_train_through_the_layer_steps(transform, monkeypatch):
    """Conditioners wider than the fused backward holds (`MAX_HIDDEN`) train through one `TritonAffineStep` or
    `TritonSplineStep` per layer."""
    from fastflow.kernels.coupling_backward import MAX_HIDDEN

    flow = _coupling_flow(transform, 4, 0, "reverse", layers=2)("triton").to(DEVICE)
    wide = CouplingFlow(4, config=FlowConfig(transform=transform, num_layers=2, hidden=MAX_HIDDEN + 16, num_bins=4),
                        backend="triton").to(DEVICE)
    x = torch.randn(8, 4, device=DEVICE)
    launches = _kernel_names(monkeypatch)
    flow.log_prob(x).sum().backward()
    assert launches == {"_coupling_flow_kernel": 1, "_coupling_flow_backward_kernel": 1}
    launches.clear()
    wide.log_prob(x).sum().backward()
    steps = (("_affine_step_forward_kernel", "_affine_step_backward_kernel") if transform == "affine" else
             ("_spline_step_forward_kernel", "_rq_backward_kernel"))
    assert launches == {name: 2 for name in steps}


def test_cuda_trains_fused_only_when_asked(monkeypatch):
    """`trains_fused`: the interpreter always (its tests cover the kernel), CUDA with FASTFLOW_FUSED_BACKWARD=1."""
    from fastflow.ops.coupling_flow import trains_fused

    monkeypatch.delenv("FASTFLOW_FUSED_BACKWARD")
    assert trains_fused(torch.device("cpu")) and not trains_fused(torch.device("cuda"))
    monkeypatch.setenv("FASTFLOW_FUSED_BACKWARD", "0")
    assert not trains_fused(torch.device("cuda"))
    monkeypatch.setenv("FASTFLOW_FUSED_BACKWARD", "1")
    assert trains_fused(torch.device("cuda"))


@pytest.mark.parametrize("transform", ["affine", "spline"])
def test_runs_not_training_fused_take_the_layer_steps_with_fused_forwards(transform, monkeypatch, backend_pair,
                                                                         fused_fp32):
    """Where the conditioners fuse but the device does not train fused (`trains_fused` false: CUDA by default),
    training takes the layer steps and inference the fused run; values and gradients against the reference."""
    from fastflow.ops import coupling_flow

    monkeypatch.setattr(coupling_flow, "trains_fused", lambda device: False)
    reference, fused = backend_pair(_coupling_flow(transform, 4, 0, "reverse"))
    x = torch.randn(21, 4, device=DEVICE)
    launches = _kernel_names(monkeypatch)
    log_prob = fused.log_prob(x)
    torch.testing.assert_close(log_prob, reference.log_prob(x), atol=ATOL, rtol=RTOL)
    grads = torch.autograd.grad(log_prob.sum(), list(fused.parameters()))
    _assert_gradients_close(grads, torch.autograd.grad(reference.log_prob(x).sum(), list(reference.parameters())))
    steps = (("_affine_step_forward_kernel", "_affine_step_backward_kernel") if transform == "affine" else
             ("_spline_step_forward_kernel", "_rq_backward_kernel"))
    assert launches == {name: 3 for name in steps}
    launches.clear()
    with torch.no_grad():
        fused.log_prob(x)
    assert launches == {"_coupling_flow_kernel": 1}


@pytest.mark.parametrize("transform, dim, context, permutation", [("affine", 5, 3, "reverse"), ("spline", 4, 2, "random"),
                                                                  ("spline", 3, 0, "reverse"), ("spline", 1, 0, "reverse")])
def test_unfused_path_without_autograd_matches_the_reference(transform, dim, context, permutation, monkeypatch,
                                                             backend_pair):
    """fp32 products on CUDA (`fuses_conditioner` false): without autograd the Triton backend runs the conditioner
    in torch, affine layers as `TritonAffineStep` and spline layers as `spline_step_forward_triton`, no fused
    kernel; log_prob and draws against the reference flow (forced here, so that CPU runs test that path too)."""
    from fastflow.ops import coupling

    monkeypatch.setattr(coupling, "fuses_conditioner", lambda precision, device: False)
    reference, fused = backend_pair(_coupling_flow(transform, dim, context, permutation))
    x = 2.0 * torch.randn(40, dim, device=DEVICE)  # some in the spline tails
    contexts = torch.randn(40, context, device=DEVICE) if context else None
    shared = contexts[0] if context else None
    launches = _kernel_names(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(fused.log_prob(x, contexts), reference.log_prob(x, contexts), atol=ATOL, rtol=RTOL)
        torch.manual_seed(1)
        draws = fused.sample(30, shared)
        torch.manual_seed(1)
        torch.testing.assert_close(draws, reference.sample(30, shared), atol=ATOL, rtol=RTOL)
    if transform == "affine":
        assert launches == {"_affine_step_forward_kernel": 6}
    else:
        assert launches == {"_spline_step_forward_kernel": 6}


def test_fused_runs_follow_parameter_updates(backend_pair, fused_fp32):
    """Every call reads the current weights: after an in-place update (an optimizer step, or through `.data`,
    which no version counter sees), a new state_dict, or new parameter objects (`assign=True`)."""
    reference, fused = backend_pair(_coupling_flow("affine", 4, 0, "reverse"))
    x = torch.randn(20, 4, device=DEVICE)
    with torch.no_grad():
        before = fused.log_prob(x)
        for flow in (reference, fused):
            for p in flow.parameters():
                p.mul_(0.5)
        torch.testing.assert_close(fused.log_prob(x), reference.log_prob(x), atol=ATOL, rtol=RTOL)
        assert not torch.allclose(before, fused.log_prob(x))
        for flow in (reference, fused):
            for p in flow.parameters():
                p.data.add_(0.1)
        torch.testing.assert_close(fused.log_prob(x), reference.log_prob(x), atol=ATOL, rtol=RTOL)
        fresh = CouplingFlow(4, config=FlowConfig(transform="affine", num_layers=3, hidden=32)).to(DEVICE)
        fused.load_state_dict(fresh.state_dict())
        torch.testing.assert_close(fused.log_prob(x), fresh.log_prob(x), atol=ATOL, rtol=RTOL)
        fused.load_state_dict(reference.state_dict(), assign=True)  # new parameter objects
        torch.testing.assert_close(fused.log_prob(x), reference.log_prob(x), atol=ATOL, rtol=RTOL)


def test_forced_triton_on_unsupported_inputs_names_the_fallback(backend_pair):
    _, fused = backend_pair(_coupling_flow("affine", 4, 0, "reverse"))
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not implement"):
        fused.double().log_prob(torch.randn(5, 4, device=DEVICE, dtype=torch.float64))


@pytest.mark.parametrize("transform, fused_training", [("affine", True), ("affine", False), ("spline", True),
                                                      ("spline", False)])
def test_second_derivatives_raise_instead_of_vanishing(transform, fused_training, monkeypatch):
    """The Triton backend's backward passes are kernels, not differentiable graphs: asking for a graph of the gradient
    (create_graph=True, for a second derivative) raises rather than returning a gradient whose own derivative misses
    the kernels' terms (`torch.autograd.grad(grad, x)` came back without them, or zero)."""
    from fastflow.ops import coupling

    monkeypatch.setattr(coupling, "fuses_conditioner", lambda precision, device: fused_training)
    flow = _coupling_flow(transform, 3, 0, "reverse", layers=2)("triton").to(DEVICE)
    x = torch.randn(5, 3, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="first order only"):
        torch.autograd.grad(flow.log_prob(x).sum(), x, create_graph=True)


@pytest.mark.parametrize("layer, fused_training", [("affine", True), ("affine", False), ("spline", True), ("spline", False)])
def test_layers_on_their_own_run_as_one_layer_runs(layer, fused_training, monkeypatch, backend_pair):
    """A coupling layer used on its own (a drop-in module in a user's model) runs as a one-layer `CouplingRun`:
    forward and inverse without autograd in one fused launch, and under autograd through the fused backward (two
    launches) or the layer step; values and gradients (parameters, input, context) against the reference layer, a
    flipped layer with a context."""
    from fastflow.ops import coupling

    monkeypatch.setattr(coupling, "fuses_conditioner", lambda precision, device: fused_training)
    make = ((lambda backend: AffineCoupling(5, 2, hidden=24, flip=True, backend=backend)) if layer == "affine" else
            (lambda backend: SplineCoupling(5, 2, hidden=24, num_bins=5, flip=True, backend=backend)))
    reference, fused = backend_pair(make)
    x = (2.0 * torch.randn(40, 5, device=DEVICE)).requires_grad_()
    context = torch.randn(40, 2, device=DEVICE, requires_grad=True)
    launches = _kernel_names(monkeypatch)
    with torch.no_grad():
        for inverse in (False, True):
            method, method_ref = (fused.inverse, reference.inverse) if inverse else (fused, reference)
            for a, b in zip(method(x, context), method_ref(x, context)):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    if fused_training:
        assert launches == {"_coupling_flow_kernel": 2}
    launches.clear()
    (y, ladj), (y_ref, ladj_ref) = fused(x, context), reference(x, context)
    cotangents = torch.randn_like(y), torch.randn_like(ladj)
    grads = torch.autograd.grad((y, ladj), [*fused.parameters(), x, context], cotangents)
    grads_ref = torch.autograd.grad((y_ref, ladj_ref), [*reference.parameters(), x, context], cotangents)
    _assert_gradients_close(grads, grads_ref)
    if fused_training:
        assert launches == {"_coupling_flow_kernel": 1, "_coupling_flow_backward_kernel": 1}
    elif layer == "affine":
        assert launches == {"_affine_step_forward_kernel": 1, "_affine_step_backward_kernel": 1}
    else:
        assert launches == {"_spline_step_forward_kernel": 1, "_rq_backward_kernel": 1}


def test_runs_check_their_inputs_as_the_layers_do():
    """The fused kernels read any width: an embedding of the wrong width, or a base of another dimension, gave
    numbers on the Triton backend where the layers one by one raise."""
    config = FlowConfig(transform="spline", num_layers=2, hidden=16)
    flow = build_flow(config, 3, 5, embedding=torch.nn.Linear(5, 4), embedding_dim=3, backend="triton").to(DEVICE)
    with pytest.raises(ValueError, match=r"context must be \(\*, 3\)"):  # (the embedding gives 4)
        flow.log_prob(torch.zeros(2, 3, device=DEVICE), torch.ones(2, 5, device=DEVICE))
    mismatched = Flow([SplineCoupling(3, backend="triton")], StandardNormal(4)).to(DEVICE)
    with pytest.raises(ValueError, match=r"x must be \(\*, 3\)"):
        mismatched.log_prob(torch.zeros(2, 4, device=DEVICE))
