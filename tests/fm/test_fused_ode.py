"""Fused Triton ODE integration of a VelocityMLP (kernels/ode.py through `fastflow.fm.fused.mlp_odeint`)
against the reference `odeint` on the same field: compiled on CUDA when a GPU is visible, else under
TRITON_INTERPRET=1 on CPU (tests/conftest.py); bad input and the fallbacks; a GPU run at a realistic size.

float32 tolerance: the interpreter's products are exact fp32, summed in another order than torch.mm
(and the first layer split into its time, state and context columns), so final states agree to a few
ulps per evaluation: atol = 1e-5 · max(1, |x|), rtol = 1e-5 over at most 16 evaluations here.

bfloat16 hidden products (`bf16=True`) against their reference (`bf16_hidden_field`, the same roundings in float32
arithmetic): atol = rtol = 2e-5 · max(1, |x|); a float32 value within an ulp of a bfloat16 rounding boundary may round
the other way in one of the two (one activation moved by 2^-8 relative), which the float32 tolerance would not cover.
"""

import pytest
import torch

from fastflow.backends import backends
from fastflow.fm import CNF, OdeConfig, VelocityMLP, odeint
from fastflow.fm import cnf as cnf_module
from fastflow.fm.fused import bf16_hidden_field, fused_unsupported, mlp_odeint

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not backends()["triton"].available, reason=backends()["triton"].reason),
]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
METHODS = ("euler", "midpoint", "heun", "rk4")
GRIDS = {
    "forward": torch.linspace(0.0, 1.0, 4),
    "backward": torch.linspace(1.0, 0.0, 4),
    "non-uniform": torch.tensor([0.0, 0.05, 0.3, 0.35, 1.0]),
}


def _field(dim, hidden, *, activation="silu", residual=False, context_dim=0, seed=0):
    torch.manual_seed(seed)
    net = VelocityMLP(dim, context_dim=context_dim, hidden=hidden, activation=activation, residual=residual)
    return net.to(DEVICE).requires_grad_(False)


def _randn(*shape):
    return torch.randn(*shape, device=DEVICE)


def _assert_fused_matches(net, x, times, method, context=None):
    fused = mlp_odeint(net, x, times, method, context=context, backend="triton")
    reference = odeint(net, x, times, method=method, args=() if context is None else (context,))
    scale = max(1.0, reference.x.abs().max().item())
    torch.testing.assert_close(fused.x, reference.x, atol=1e-5 * scale, rtol=1e-5)
    assert fused.evaluations == reference.evaluations
    return fused


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("method", METHODS)
def test_each_method_and_grid_matches_reference(method, grid):
    net = _field(3, (24, 24), context_dim=2)
    _assert_fused_matches(net, _randn(37, 3), GRIDS[grid], method, _randn(37, 2))


@pytest.mark.parametrize("dim, hidden, activation, residual, context_dim", [
    (1, (16,), "silu", False, 0),              # one hidden layer, 1-D state
    (2, (20, 20), "tanh", True, 0),            # width not a power of 2, residual
    (3, (32, 32, 32), "gelu", False, 3),       # odd state dimension, context
    (2, (24, 24, 24, 24), "relu", True, 1),    # four hidden layers
    (5, (48, 48, 48), "silu", True, 4),
    (2, (100, 100), "tanh", False, 0),         # BLOCK_H 128: scratch tile, 8 weight chunks of 16
    (3, (130, 130), "silu", True, 2),          # BLOCK_H 256: weights streamed, not kept on chip
])
def test_velocity_configurations_match_reference(dim, hidden, activation, residual, context_dim):
    net = _field(dim, hidden, activation=activation, residual=residual, context_dim=context_dim)
    n = 64 if hidden[0] <= 64 else 16
    context = _randn(n, context_dim) if context_dim else None
    _assert_fused_matches(net, _randn(n, dim), torch.tensor([0.0, 0.4, 1.0]), "rk4", context)


def test_3xtf32_products_keep_the_fp32_tolerance():
    net = _field(3, (32, 32), context_dim=2)
    x, context = _randn(40, 3), _randn(40, 2)
    fused = mlp_odeint(net, x, GRIDS["forward"], "rk4", context=context, backend="triton", precision="tf32x3")
    reference = odeint(net, x, GRIDS["forward"], method="rk4", args=(context,))
    torch.testing.assert_close(fused.x, reference.x, atol=1e-5 * max(1.0, reference.x.abs().max().item()), rtol=1e-5)


def test_launch_settings_change_the_tiling_not_the_result():
    """Width 64: the default takes the hidden width in one chunk; block_k=16 goes through the scratch tile."""
    net, x = _field(2, (64, 64)), _randn(50, 2)
    default = mlp_odeint(net, x, GRIDS["forward"], "heun", backend="triton").x
    tuned = mlp_odeint(net, x, GRIDS["forward"], "heun", backend="triton", launch=dict(block_m=16, block_k=16, num_warps=2)).x
    torch.testing.assert_close(tuned, default, atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="block_q"):
        mlp_odeint(net, x, GRIDS["forward"], "heun", backend="triton", launch=dict(block_q=16))
    for bad in (dict(block_n=24), dict(block_n=128), dict(k_stages=0), dict(programs=0)):
        with pytest.raises(ValueError):
            mlp_odeint(net, x, GRIDS["forward"], "heun", backend="triton", launch=bad)


@pytest.mark.parametrize("hidden, context_dim, residual, launch", [
    ((64, 64), 2, False, dict(block_n=16, block_k=32, k_stages=2)),     # chunks both ways, pipelined weight loop
    ((48, 48, 48), 0, True, dict(block_n=32, programs=1)),             # 2 tiles on 1 program, residual
    ((20,), 3, False, dict(block_n=16, block_m=16, programs=3)),       # one hidden layer; 4 tiles on 3 programs
])
def test_streamed_layers_and_persistent_programs_match_reference(hidden, context_dim, residual, launch):
    """Layers computed block_n outputs at a time through two scratch tiles (`_velocity_streamed`), and fewer
    programs than tiles each looping over tiles: the reference's states to the fp32 tolerance."""
    net = _field(3, hidden, residual=residual, context_dim=context_dim)
    x = _randn(60, 3)
    context = _randn(60, context_dim) if context_dim else None
    fused = mlp_odeint(net, x, GRIDS["non-uniform"], "rk4", context=context, backend="triton", launch=launch)
    reference = odeint(net, x, GRIDS["non-uniform"], method="rk4", args=() if context is None else (context,))
    torch.testing.assert_close(fused.x, reference.x, atol=1e-5 * max(1.0, reference.x.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("hidden, context_dim, residual, launch", [
    ((24, 24), 2, False, {}),                                           # whole layers in registers
    ((64, 64, 64), 0, True, {}),                                        # residual: adds the rounded input
    ((100, 100), 0, False, {}),                                         # chunks of 16 through the scratch tile
    ((130, 130), 2, True, {}),                                          # width 256: weights streamed
    ((64, 64), 2, False, dict(block_n=16, block_k=32, k_stages=2)),     # streamed layers, both ways chunked
    ((48, 48, 48), 0, True, dict(block_n=32, programs=1)),             # streamed, persistent, residual
    ((20,), 3, False, {}),                                              # one hidden layer: nothing rounded
])
def test_bf16_hidden_products_match_their_reference(hidden, context_dim, residual, launch):
    """The kernel's bf16 mode against `odeint` on `bf16_hidden_field` (the reference `mlp_odeint` runs for it), to
    2e-5; that reference differs from float32 by far more wherever a hidden product exists (so the tolerance
    tells rounding from not rounding), and stays within 2e-3 of it over these 8 RK4 evaluations."""
    net = _field(3, hidden, residual=residual, context_dim=context_dim)
    x = _randn(40, 3)
    context = _randn(40, context_dim) if context_dim else None
    grid = torch.tensor([0.0, 0.4, 1.0])
    fused = mlp_odeint(net, x, grid, "rk4", context=context, backend="triton", bf16=True, launch=launch)
    reference = mlp_odeint(net, x, grid, "rk4", context=context, backend="reference", bf16=True)
    scale = max(1.0, reference.x.abs().max().item())
    torch.testing.assert_close(fused.x, reference.x, atol=2e-5 * scale, rtol=2e-5)
    assert fused.evaluations == reference.evaluations == 8
    float32 = odeint(net, x, grid, method="rk4", args=() if context is None else (context,)).x
    gap = (reference.x - float32).abs().max().item()
    assert gap <= 2e-3 * scale
    assert gap > 1e-5 * scale if len(hidden) > 1 else gap <= 1e-5 * scale


def test_bf16_hidden_field_rounds_each_hidden_input_and_weight():
    """`bf16_hidden_field` against the layers written out in float64 with the hidden inputs and weights rounded to
    bfloat16: the same in a float64 field, and to 1e-6 in a float32 one (exact products, float32 sums)."""
    net = _field(2, (32, 32, 32), residual=True, context_dim=3).cpu().double()
    t, x, context = torch.tensor(0.3), torch.randn(16, 2), torch.randn(16, 3)

    def rounded(tensor):
        return tensor.bfloat16().double()

    h = torch.nn.functional.silu(net.layers[0](net.inputs(t, x.double(), context.double())))
    for layer in net.layers[1:]:
        h = rounded(h)
        h = h + torch.nn.functional.silu(h @ rounded(layer.weight).t() + layer.bias)
    expected = net.output(h)
    # a float64 field sums in float64: the same values as written out
    torch.testing.assert_close(bf16_hidden_field(net)(t, x.double(), context.double()), expected, atol=1e-12, rtol=1e-12)
    net.float()
    torch.testing.assert_close(bf16_hidden_field(net)(t, x, context).double(), expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(net(t, x, context).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hidden", [(16, 32, 32), (11, 11)])  # unequal widths; a residual first layer (9 + 2 inputs)
def test_bf16_reference_takes_fields_the_kernel_does_not(hidden):
    """`mlp_odeint(bf16=True)` on a field the kernel refuses runs its reference, residuals where `forward` has them:
    within bfloat16's rounding of the float32 field (and not equal to it)."""
    net = _field(2, hidden, residual=True).cpu()
    t, x = torch.tensor(0.3), torch.randn(32, 2)
    bf16, exact = bf16_hidden_field(net)(t, x), net(t, x)
    assert 0 < (bf16 - exact).abs().max() <= 2e-2 * exact.abs().max()
    assert fused_unsupported(net, x, "rk4") is not None
    assert mlp_odeint(net, x, GRIDS["forward"], "rk4", bf16=True).x.isfinite().all()


def test_shared_context_vector_and_rows_not_a_multiple_of_the_tile():
    net = _field(2, (16, 16), context_dim=3)
    x, context = _randn(70, 2), _randn(3)  # 70 rows: two tiles of 64, the second partial
    fused = _assert_fused_matches(net, x, GRIDS["forward"], "heun", context.expand(70, 3).contiguous())
    torch.testing.assert_close(mlp_odeint(net, x, GRIDS["forward"], "heun", context=context, backend="triton").x, fused.x)


@pytest.mark.parametrize("context_dim", [0, 2])
def test_trajectory_launches_one_step_grids_and_matches_the_reference(context_dim):
    """The states at every grid time (one launch per interval) match odeint's trajectory, and the last one the
    single launch for the whole grid."""
    net = _field(2, (16, 16), context_dim=context_dim)
    x_0, grid = _randn(16, 2), GRIDS["non-uniform"]
    context = _randn(16, context_dim) if context_dim else None
    fused = mlp_odeint(net, x_0, grid, "rk4", context=context, backend="triton", trajectory=True)
    reference = odeint(net, x_0, grid, method="rk4", args=() if context is None else (context,), trajectory=True)
    assert fused.trajectory.shape == (len(grid), 16, 2)
    assert torch.equal(fused.trajectory[0], x_0) and torch.equal(fused.trajectory[-1], fused.x)
    torch.testing.assert_close(fused.trajectory, reference.trajectory, atol=1e-5, rtol=1e-5)
    whole = mlp_odeint(net, x_0, grid, "rk4", context=context, backend="triton")
    torch.testing.assert_close(fused.x, whole.x, atol=1e-6, rtol=1e-6)
    assert fused.evaluations == whole.evaluations == reference.evaluations


def test_auto_runs_the_reference_on_cpu_and_for_unsupported_configurations():
    net, x = _field(2, (16, 16)).cpu(), torch.randn(8, 2)
    expected = odeint(net, x, GRIDS["forward"], method="rk4").x
    assert torch.equal(mlp_odeint(net, x, GRIDS["forward"], "rk4").x, expected)  # CPU: the reference, bit for bit
    double = _field(2, (16, 16)).cpu().double()
    result = mlp_odeint(double, x.double(), GRIDS["forward"], "rk4", backend="auto")
    assert result.x.dtype == torch.float64
    dopri = mlp_odeint(net, x, GRIDS["forward"], "dopri5", backend="auto")
    assert dopri.x.shape == (8, 2)


@pytest.mark.parametrize("change, match", [
    (lambda net, x: (_field(2, (16, 32)), x, "rk4"), "not all equal"),
    (lambda net, x: (_field(2, (16,) * 5), x, "rk4"), "at most 4"),
    (lambda net, x: (_field(2, (300,)), x, "rk4"), "width <= 256"),
    (lambda net, x: (net, x, "dopri5"), "fixed-step"),
    (lambda net, x: (net.double(), x.double(), "rk4"), "float32"),
    (lambda net, x: (net, x.t().contiguous().t(), "rk4"), "non-contiguous"),
])
def test_unsupported_configurations_raise_and_name_the_reference(change, match):
    net, x, method = change(_field(2, (16, 16)), _randn(8, 2))
    with pytest.raises(ValueError, match=f"{match}.*backend='reference'"):
        mlp_odeint(net, x, GRIDS["forward"], method, backend="triton")


def test_a_triton_backend_forced_by_the_environment_names_the_reason(monkeypatch):
    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    with pytest.raises(ValueError, match="not all equal.*backend='reference'"):
        mlp_odeint(_field(2, (16, 32)), _randn(8, 2), GRIDS["forward"], "rk4")


def test_unsupported_activation_and_grad_raise():
    net, x = _field(2, (16, 16)), _randn(8, 2)
    net.activation = "softplus"  # a field whose activation the kernel does not implement
    with pytest.raises(ValueError, match="activation 'softplus'.*backend='reference'"):
        mlp_odeint(net, x, GRIDS["forward"], "rk4", backend="triton")
    trainable = _field(2, (16, 16)).requires_grad_(True)
    with pytest.raises(ValueError, match="forward only.*no_grad"):
        mlp_odeint(trainable, x, GRIDS["forward"], "rk4", backend="triton")
    with torch.no_grad():
        mlp_odeint(trainable, x, GRIDS["forward"], "euler", backend="triton")
    with pytest.raises(ValueError, match="precision must be one of"):  # (under autograd a bad one passed unchecked)
        mlp_odeint(trainable, x, GRIDS["forward"], "rk4", precision="bogus")
    with pytest.raises(TypeError, match="bf16"):
        mlp_odeint(net, x, GRIDS["forward"], "rk4", bf16="yes")
    with pytest.raises(ValueError, match="VelocityMLP"):
        mlp_odeint(torch.nn.Linear(2, 2).to(DEVICE), x, GRIDS["forward"], "rk4", bf16=True)
    assert fused_unsupported(torch.nn.Linear(2, 2), x, "rk4") is not None


def test_bad_input():
    net, x = _field(2, (16, 16), context_dim=2), _randn(8, 2)
    context = _randn(8, 2)
    with pytest.raises(ValueError, match="NaN"):
        mlp_odeint(net, x.index_fill(0, torch.tensor([3], device=DEVICE), float("nan")), GRIDS["forward"], context=context, backend="triton")
    with pytest.raises(ValueError, match="strictly increasing"):
        mlp_odeint(net, x, [0.0, 0.5, 0.3, 1.0], context=context, backend="triton")
    with pytest.raises(ValueError, match="needs a context"):
        mlp_odeint(net, x, GRIDS["forward"], backend="triton")
    with pytest.raises(ValueError, match="context must be"):
        mlp_odeint(net, x, GRIDS["forward"], context=_randn(5, 2), backend="triton")
    with pytest.raises(ValueError, match=r"must be \(n, 2\)"):
        mlp_odeint(net, _randn(8, 3), GRIDS["forward"], context=context, backend="triton")
    with pytest.raises(ValueError, match="unknown ODE method"):
        mlp_odeint(net, x, GRIDS["forward"], "rk5", context=context, backend="triton")
    with pytest.raises(ValueError, match="one device"):
        mlp_odeint(net, x.to("meta"), GRIDS["forward"], context=context, backend="triton")
    with pytest.raises(TypeError, match="trajectory must be True or False"):
        mlp_odeint(net, x, GRIDS["forward"], context=context, backend="triton", trajectory="yes")


def test_cnf_sampling_on_cpu_keeps_the_reference_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("CPU sampling must not go through mlp_odeint")

    monkeypatch.setattr(cnf_module, "mlp_odeint", refuse)
    cnf = CNF(_field(2, (16,), context_dim=3).cpu(), 2, context_dim=3, sampler=OdeConfig(method="rk4", steps=3))
    assert cnf.sample(4, torch.randn(5, 3)).shape == (4, 5, 2)
    assert cnf.last_evaluations == 12


@pytest.mark.gpu
def test_gpu_realistic_size_matches_reference():
    """10^5 samples, 3 × 256 SiLU with context, 100 RK4 steps (400 evaluations) on CUDA, fp32 ("ieee")
    products: the fused and reference states agree to atol = rtol = 1e-4 (differences accumulate over
    400 evaluations of a width-256 field); TF32 products get 2e-2."""
    net = _field(10, (256,) * 3, context_dim=4).cuda()
    x, context = torch.randn(100_000, 10, device="cuda"), torch.randn(100_000, 4, device="cuda")
    times = torch.linspace(0.0, 1.0, 101)
    reference = odeint(net, x, times, method="rk4", args=(context,)).x
    fused = mlp_odeint(net, x, times, "rk4", context=context, backend="triton", precision="ieee").x
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
    tf32 = mlp_odeint(net, x, times, "rk4", context=context, backend="triton", precision="tf32").x
    torch.testing.assert_close(tf32, reference, atol=2e-2, rtol=2e-2)
    # TF32 products take the approximate activations by default (tanh.approx.f32, ~2^-11 relative): against the
    # exact ones with the same products, 5e-3 (TF32's own rounding moves the states 1e-3 apart over 400 evaluations)
    exact = mlp_odeint(net, x, times, "rk4", context=context, backend="triton", precision="tf32",
                       launch={"approximate": False}).x
    torch.testing.assert_close(tf32, exact, atol=5e-3, rtol=5e-3)
    # bfloat16 hidden products (TF32 first and output layers, approximate activations) against float32: as TF32's
    bf16 = mlp_odeint(net, x, times, "rk4", context=context, backend="triton", bf16=True).x
    torch.testing.assert_close(bf16, reference, atol=2e-2, rtol=2e-2)
    cnf = CNF(net, 10, context_dim=4, sampler=OdeConfig(method="rk4", steps=10))
    assert cnf.sample(1000, torch.randn(4, device="cuda")).isfinite().all()


@pytest.mark.gpu
def test_bf16_sampling_on_cuda_runs_the_fused_kernel(monkeypatch):
    """`OdeConfig(mixed_precision="bf16")` on CUDA integrates a VelocityMLP in the fused kernel's bf16 mode (exact
    fp32 first and output layers here, so that its reference agrees to the interpreter's tolerance)."""
    calls = []
    fused = cnf_module.mlp_odeint

    def spy(*args, **kwargs):
        calls.append(kwargs["bf16"])
        return fused(*args, **kwargs, precision="ieee")

    monkeypatch.setattr(cnf_module, "mlp_odeint", spy)
    net = _field(2, (64, 64), context_dim=3).cuda()
    cnf = CNF(net, 2, context_dim=3, sampler=OdeConfig(method="rk4", steps=5, mixed_precision="bf16"))
    context = torch.randn(3, device="cuda")
    torch.manual_seed(1)
    draws = cnf.sample(500, context)
    assert calls == [True]
    torch.manual_seed(1)
    x_0 = torch.randn(500, 2, device="cuda")
    expected = mlp_odeint(net, x_0, torch.linspace(0.0, 1.0, 6), "rk4", context=context, backend="reference", bf16=True).x
    torch.testing.assert_close(draws, expected, atol=1e-4, rtol=1e-4)


def test_one_context_for_all_samples_is_folded_into_the_time_bias(monkeypatch):
    """A context `(E,)` shared by every sample reaches the kernel as a time-bias term (no per-sample context
    tile) and integrates as the reference with the context expanded to `(n, E)`."""
    import fastflow.kernels.ode as ode_kernels

    launched = {}
    kernel = ode_kernels.mlp_odeint_triton

    def spy(*args, **kwargs):
        launched["context_bias"] = args[3]
        return kernel(*args, **kwargs)

    monkeypatch.setattr(ode_kernels, "mlp_odeint_triton", spy)
    net = _field(3, (32, 32), context_dim=4)
    x, context = _randn(50, 3), _randn(4)
    fused = mlp_odeint(net, x, GRIDS["forward"], "rk4", context=context, backend="triton")
    assert launched["context_bias"] is None
    reference = odeint(net, x, GRIDS["forward"], method="rk4", args=(context.expand(50, -1),))
    torch.testing.assert_close(fused.x, reference.x, atol=1e-5 * max(1.0, reference.x.abs().max().item()), rtol=1e-5)
    assert torch.equal(mlp_odeint(net, x, GRIDS["forward"], "rk4", context=context, backend="reference").x, reference.x)
