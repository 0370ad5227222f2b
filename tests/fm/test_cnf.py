"""CNF: exact log-density of a linear flow, shapes and broadcasting, differentiable log_prob,
a learned 1-D Gaussian, and bad input."""

import dataclasses
import math

import pytest
import torch

from fastflow.flows import Standardize
from fastflow.fm import CNF, OdeConfig, VelocityMLP, cfm_loss, get_path
from fastflow.fm.nets import BLOCK_ROWS
from fastflow.inference.fmpe import FMPE_SAMPLER
from fastflow.train import fit


class Linear(torch.nn.Module):
    """v(t, x) = w x: x_1 = e^w x_0 ~ N(0, e^{2w} I)."""

    def __init__(self, w=-0.5):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, t, x):
        return self.w * x


@pytest.mark.parametrize("config", [OdeConfig(), OdeConfig(method="rk4", steps=10), OdeConfig(method="heun", steps=50),
                                    OdeConfig(method="rk4", steps=10, spacing=2.0)])
def test_linear_flow_log_prob_is_exact(config):
    cnf = CNF(Linear(), 3, likelihood=config, sampler=config)
    x = torch.randn(50, 3, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, math.exp(-0.5)).log_prob(x).sum(-1)
    torch.testing.assert_close(cnf.log_prob(x).detach(), expected, atol=1e-3, rtol=0)
    assert abs(cnf.sample(20_000).std().item() - math.exp(-0.5)) < 0.01


def test_log_prob_under_inference_mode_keeps_the_divergence():
    """Autograd records nothing under inference_mode: the exact divergence came back 0 (log q off by D·w = 1.5)."""
    cnf = CNF(Linear(), 3)
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, math.exp(-0.5)).log_prob(x).sum(-1)
    with torch.inference_mode():
        torch.testing.assert_close(cnf.log_prob(x), expected, atol=1e-3, rtol=0)
    conditional = CNF(VelocityMLP(2, hidden=(16,), context_dim=3), 2, context_dim=3)  # (the context an inference tensor too)
    x, context = torch.randn(4, 2), torch.randn(3)
    with torch.no_grad():
        expected = conditional.log_prob(x, context)
    with torch.inference_mode():
        torch.testing.assert_close(conditional.log_prob(x, context), expected)


class NarrowGaussianFlow(torch.nn.Module):
    """The exact flow of the conditional OT path (sigma_min 0) from N(0, I) to N(0, diag(spread²)): x_t = sd_t x_0
    with sd_t = sqrt(t² spread² + (1 - t)²), so v(t, x) = x sd_t' / sd_t; it contracts within t ~ 1 - spread."""

    def __init__(self, spread):
        super().__init__()
        self.register_buffer("spread", torch.as_tensor(spread, dtype=torch.float64))

    def forward(self, t, x):
        s2 = self.spread.square()
        variance = t.square() * s2 + (1 - t).square()
        return x * (t * s2 - (1 - t)) / variance


def test_spacing_places_the_fixed_steps_toward_the_data_end():
    even, spaced = OdeConfig("rk4", steps=4), OdeConfig("rk4", steps=4, spacing=2.0)
    torch.testing.assert_close(even.times(0.0, 1.0), torch.linspace(0, 1, 5, dtype=torch.float64))
    torch.testing.assert_close(spaced.times(0.0, 1.0), torch.tensor([0.0, 0.4375, 0.75, 0.9375, 1.0], dtype=torch.float64))
    torch.testing.assert_close(spaced.times(1.0, 0.0), spaced.times(0.0, 1.0).flip(0))  # log_prob's direction
    assert OdeConfig(spacing=3.0).times(0.0, 1.0).tolist() == [0.0, 1.0]  # adaptive: the ends
    for bad in (0.5, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="spacing must be"):
            OdeConfig("rk4", spacing=bad)
    with pytest.raises(ValueError, match="between t = 0 and t = 1"):
        even.times(0.0, 0.5)
    cnf = CNF(Linear(), 3, sampler=spaced)
    assert cnf.sample_trajectory(2).shape == (5, 2, 3)


def test_spaced_steps_resolve_a_narrow_flow():
    """The flow is linear, x_1 = spread x_0: RK4 × 10 even steps leave a spread of 0.013 about 1.3x too wide (the
    flow contracts within its last step); steps that shrink toward t = 1 get it within 2 %, and the wide coordinate
    stays right."""
    spread = torch.tensor([0.5, 0.013], dtype=torch.float64)
    for spacing, close in ((1.0, False), (2.0, True)):
        cnf = CNF(NarrowGaussianFlow(spread), 2, sampler=OdeConfig("rk4", steps=10, spacing=spacing))
        path = cnf.sample_trajectory(4)
        ratio = path[-1] / path[0] / spread
        assert ((ratio[:, 0] - 1).abs() < 0.02).all()
        assert ((ratio[:, 1] - 1).abs() < 0.02).all() == close, ratio


@pytest.mark.parametrize("spread", [0.3, 0.03, 0.01, 0.005])
def test_fmpes_default_sampler_resolves_posteriors_down_to_half_a_percent_of_the_prior(spread):
    """FMPE samples in a space where the prior has unit scale: a posterior 1 % of a wide box's width has a spread
    ~0.017 there (even RK4 steps gave variances 1.3x and correlations -0.40 for -0.80 on such a posterior)."""
    cnf = CNF(NarrowGaussianFlow(spread), 1, sampler=dataclasses.replace(FMPE_SAMPLER, mixed_precision="off"))
    path = cnf.sample_trajectory(2)
    torch.testing.assert_close(path[-1] / path[0], torch.full((2, 1), spread, dtype=torch.float64), rtol=0.05, atol=0)


class _AnalyticField(torch.nn.Module):
    """v(t, x) = -x · rate with the rate a buffer: a field without parameters."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rate", torch.tensor(0.5, dtype=torch.float64))

    def forward(self, t, x):
        return -self.rate * x


@pytest.mark.parametrize("field", [_AnalyticField(), lambda t, x: 0.5 * x])
def test_a_field_without_parameters(field):
    """The flow's dtype and device came from the field's first parameter: StopIteration without one."""
    module = field if isinstance(field, torch.nn.Module) else _Lambda(field)
    cnf = CNF(module, 2)
    sign = -1.0 if isinstance(field, torch.nn.Module) else 1.0  # x_1 = e^{±0.5} x_0
    dtype = torch.float64 if isinstance(field, torch.nn.Module) else torch.get_default_dtype()
    x = torch.randn(4, 2, dtype=dtype)
    expected = torch.distributions.Normal(0.0, math.exp(0.5 * sign)).log_prob(x).sum(-1)
    torch.testing.assert_close(cnf.log_prob(x).detach(), expected, atol=1e-3, rtol=0)
    assert cnf.sample(3).dtype == dtype


class _Lambda(torch.nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, t, x):
        return self.function(t, x)


def test_shapes_and_broadcasting():
    cnf = CNF(VelocityMLP(2, context_dim=3, hidden=(16,)), 2, context_dim=3, sampler=OdeConfig(method="euler", steps=3))
    assert cnf.sample(4, torch.randn(3)).shape == (4, 2)
    assert cnf.sample(4, torch.randn(5, 3)).shape == (4, 5, 2)
    with torch.no_grad():
        assert cnf.log_prob(torch.randn(4, 5, 2), torch.randn(5, 3)).shape == (4, 5)
        assert cnf.log_prob(torch.randn(7, 2), torch.randn(3)).shape == (7,)


@pytest.mark.parametrize("sampler", [OdeConfig(), OdeConfig(method="rk4", steps=8)])
def test_sample_trajectory_follows_the_exact_paths_in_data_space(sampler):
    """v = w x carries x_0 to e^{w t} x_0; the states come back through the transforms (here x = 3 + 2 z)."""
    cnf = CNF(Linear(), 3, transforms=[Standardize(torch.full((3,), 3.0), torch.full((3,), 2.0))], sampler=sampler)
    times = torch.tensor([0.0, 0.25, 0.5, 1.0])
    paths = cnf.sample_trajectory(6, times=times)
    assert paths.shape == (4, 6, 3)
    z_0 = (paths[0] - 3.0) / 2.0
    expected = 3.0 + 2.0 * torch.exp(-0.5 * times.double())[:, None, None] * z_0
    torch.testing.assert_close(paths, expected, atol=1e-4, rtol=0)
    default = cnf.sample_trajectory(2)  # the sampler's grid for fixed steps, 11 times for adaptive ones
    assert default.shape == ((9 if sampler.method == "rk4" else 11), 2, 3)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("bf16", [False, True])
def test_adaptive_sampling_with_several_contexts(method, bf16):
    """Adaptive solves drop finished rows: each row's context must go with it (the field held the whole batch's
    context term, and sampling with a (B, C) context under the default dopri5 raised). Same draws as the plain
    forward with the context rows passed to odeint."""
    from fastflow.fm import odeint

    net = VelocityMLP(2, context_dim=3, hidden=(32, 32))
    config = OdeConfig(method=method, rtol=1e-6, atol=1e-6, mixed_precision="bf16" if bf16 else "off")
    cnf = CNF(net, 2, context_dim=3, sampler=config)
    context = torch.randn(4, 3) * 3
    torch.manual_seed(2)
    samples = cnf.sample(50, context)
    torch.manual_seed(2)
    x_0 = torch.randn(200, 2)
    with torch.no_grad():
        expected = odeint(net, x_0, [0.0, 1.0], method=method, args=(context.repeat(50, 1),), rtol=config.rtol,
                          atol=config.atol).x.view(50, 4, 2)
    assert samples.shape == (50, 4, 2)
    tolerance = 2e-2 if bf16 else 1e-5
    torch.testing.assert_close(samples, expected, atol=tolerance * expected.abs().max().item(), rtol=0)
    assert cnf.sample_trajectory(50, context).shape == (11, 50, 4, 2)


def test_sample_trajectory_ends_on_the_samples_and_broadcasts_contexts():
    cnf = CNF(VelocityMLP(2, context_dim=3, hidden=(16,)), 2, context_dim=3, sampler=OdeConfig(method="rk4", steps=4))
    context = torch.randn(5, 3)
    torch.manual_seed(1)
    samples = cnf.sample(7, context)
    torch.manual_seed(1)
    paths = cnf.sample_trajectory(7, context)
    assert paths.shape == (5, 7, 5, 2)
    torch.testing.assert_close(paths[-1], samples, atol=1e-6, rtol=1e-6)
    assert cnf.sample_trajectory(7, context[0], times=[0.0, 0.5]).shape == (2, 7, 2)
    for times in ([0.1, 1.0], [0.0, 0.6, 0.5], [0.0, 1.5], [0.0]):
        with pytest.raises(ValueError, match="increasing grid from 0 to at most 1"):
            cnf.sample_trajectory(2, context[0], times=times)


def test_log_prob_is_differentiable_in_x():
    cnf = CNF(Linear(), 2)
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    cnf.log_prob(x).sum().backward()
    # ∇ log N(x; 0, e^{-1}) = -x e
    torch.testing.assert_close(x.grad, -x.detach() * math.e, atol=1e-3, rtol=1e-3)


def test_flow_matching_learns_a_gaussian():
    data = 2.0 + 0.5 * torch.randn(4000, 1)
    net = VelocityMLP(1, hidden=(32, 32))
    path = get_path("ot")
    fit(net, lambda model, x_1: cfm_loss(model, path, x_1), (data,), batch_size=256, learning_rate=3e-3, max_epochs=30,
        validation_fraction=0.0, progress=False)
    cnf = CNF(net, 1)
    samples = cnf.sample(20_000)
    assert abs(samples.mean().item() - 2.0) < 0.05 and abs(samples.std().item() - 0.5) < 0.05
    with torch.no_grad():
        x = torch.linspace(1.5, 2.5, 5).unsqueeze(-1)  # within 1 sd, where the fit is tight
        expected = torch.distributions.Normal(2.0, 0.5).log_prob(x).squeeze(-1)
        torch.testing.assert_close(cnf.log_prob(x), expected, atol=0.1, rtol=0)


def test_bad_input():
    cnf = CNF(VelocityMLP(2, hidden=(8,)), 2)
    with pytest.raises(ValueError, match="positive int"):
        cnf.sample(0)
    with pytest.raises(ValueError, match="unconditional"):
        cnf.sample(3, torch.randn(2))
    with pytest.raises(ValueError, match="last dimension 2"):
        cnf.log_prob(torch.randn(3, 4))
    with pytest.raises(ValueError, match="last dimension 2"):
        cnf.log_prob(torch.tensor(0.5))
    with pytest.raises(ValueError, match="NaN"):
        cnf.log_prob(torch.tensor([[math.nan, 0.0]]))
    with pytest.raises(ValueError, match="x is torch.float64 but the flow's parameters are torch.float32"):
        cnf.log_prob(torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown divergence"):
        CNF(VelocityMLP(2), 2, divergence="hutch")
    with pytest.raises(ValueError, match="unknown ODE method"):
        OdeConfig(method="rk45")
    with pytest.raises(ValueError, match="steps"):
        OdeConfig(method="rk4", steps=0)
    with pytest.raises(ValueError, match="steps"):
        OdeConfig(method="rk4", steps=True)
    with pytest.raises(ValueError, match="finite positive"):
        OdeConfig(rtol=math.nan)
    conditional = CNF(VelocityMLP(2, context_dim=3, hidden=(8,)), 2, context_dim=3)
    with pytest.raises(ValueError, match="context contains NaN"):
        conditional.sample(2, torch.tensor([math.nan, 0.0, 0.0]))
    field = VelocityMLP(2, context_dim=3, hidden=(8,))
    with pytest.raises(ValueError, match=r"t must be a scalar, \(3,\) or \(3, 1\)"):
        field(torch.zeros(5), torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"context \(3,\) or \(3, 3\), got \(4, 3\)"):
        field(torch.zeros(3), torch.zeros(3, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x_t is torch.float64"):
        field(torch.zeros(3), torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 3))


def test_empty_batches_with_a_context():
    cnf = CNF(VelocityMLP(2, context_dim=3, hidden=(8,)), 2, context_dim=3)
    assert cnf.log_prob(torch.zeros(0, 2), torch.randn(3)).shape == (0,)
    assert cnf.sample(3, torch.zeros(0, 3)).shape == (3, 0, 2)


class Drift(torch.nn.Module):
    """v = c, independent of x: divergence 0, log q(x) = log N(x - c; 0, I)."""

    def __init__(self):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

    def forward(self, t, x):
        return self.c.expand_as(x)


def test_exact_divergence_of_a_field_that_ignores_x():
    cnf = CNF(Drift(), 2)
    x = torch.randn(4, 2)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x - cnf.velocity.c).sum(-1)
    torch.testing.assert_close(cnf.log_prob(x), expected, atol=1e-5, rtol=0)


def test_contexts_are_cast_to_the_fields_dtype():
    """Observations of another dtype (float64 from numpy, integer counts) condition as their float32 values."""
    cnf = CNF(VelocityMLP(2, context_dim=3, hidden=(8,)), 2, context_dim=3, sampler=OdeConfig(method="euler", steps=4))
    context = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    x = torch.randn(2, 2)
    torch.testing.assert_close(cnf.log_prob(x, context.double()), cnf.log_prob(x, context))
    torch.testing.assert_close(cnf.log_prob(x, context.long()), cnf.log_prob(x, context))
    torch.manual_seed(0)
    draws = cnf.sample(3, context.long())
    torch.manual_seed(0)
    torch.testing.assert_close(draws, cnf.sample(3, context))
    assert draws.dtype == torch.float32


def eight_gaussians(n, generator):
    angles = 2 * math.pi * torch.randint(0, 8, (n,), generator=generator) / 8
    centers = 2.0 * torch.stack([angles.cos(), angles.sin()], -1)
    return centers + 0.2 * torch.randn(n, 2, generator=generator)


@pytest.mark.slow
def test_eight_gaussians_c2st():
    from fastflow.metrics import c2st

    data = eight_gaussians(20_000, torch.Generator().manual_seed(0))
    net = VelocityMLP(2, hidden=(128, 128, 128))
    path = get_path("ot")
    fit(net, lambda model, x_1: cfm_loss(model, path, x_1), (data,), batch_size=512, learning_rate=2e-3, max_epochs=150,
        validation_fraction=0.0, lr_schedule="cosine", progress=False)
    samples = CNF(net, 2).sample(5000)
    assert c2st(samples, eight_gaussians(5000, torch.Generator().manual_seed(1))) <= 0.55


N_BLOCKED = 2 * BLOCK_ROWS + 3  # rows: two whole blocks and a partial one


def _times(form: str, n: int, dtype: torch.dtype):
    """t as fixed-step solvers (a 0-d tensor), callers (`(n,)`) and adaptive solvers (`(n, 1)`) pass it."""
    t = torch.rand(n, dtype=dtype)
    return {"scalar": torch.tensor(0.3, dtype=dtype), "rows": t, "column": t.unsqueeze(-1)}[form]


def _contexts(form: str, n: int, dtype: torch.dtype):
    return {"none": None, "shared": torch.randn(2, dtype=dtype), "rows": torch.randn(n, 2, dtype=dtype)}[form]


@pytest.mark.parametrize("activation", ["silu", "tanh", "relu", "gelu"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("time_form, context_form", [("scalar", "shared"), ("rows", "rows"), ("column", "none"),
                                                     ("scalar", "rows"), ("column", "shared")])
def test_velocity_without_a_graph_equals_the_recorded_forward(activation, dtype, tolerance, residual, time_form,
                                                              context_form):
    """Sampling (no graph) runs the layers on CPU by blocks of rows, the first from its x_t columns and its time and
    context terms, activations in place; and `sampling_field` computes the context term once: same values for every
    form of t and context."""
    context_dim = 0 if context_form == "none" else 2
    net = VelocityMLP(3, context_dim=context_dim, hidden=(16, 16, 16), activation=activation, residual=residual).to(dtype)
    x, t, context = torch.randn(N_BLOCKED, 3, dtype=dtype), _times(time_form, N_BLOCKED, dtype), _contexts(
        context_form, N_BLOCKED, dtype)
    expected = net(t, x, context)
    with torch.no_grad():
        torch.testing.assert_close(net(t, x, context), expected.detach(), atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(net.sampling_field(context)(t, x), expected.detach(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bf16_sampling_field_is_close_to_the_field(activation, dtype):
    """bfloat16 hidden layers (8-bit significands) against the field in its own dtype: measured 5e-3 of the largest
    |v| (float32; 4 residual hidden layers of 128); v stays in the state's dtype."""
    torch.manual_seed(0)
    net = VelocityMLP(3, context_dim=2, hidden=(128,) * 4, activation=activation, residual=True).to(dtype)
    x, context = torch.randn(N_BLOCKED, 3, dtype=dtype), torch.randn(N_BLOCKED, 2, dtype=dtype)
    with torch.no_grad():
        expected = net(0.7, x, context)
        v = net.sampling_field(context, bf16=True)(torch.tensor(0.7, dtype=dtype), x)
    assert v.dtype == dtype
    assert 0 < (v - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_sampling_field_bad_input():
    net = VelocityMLP(2, context_dim=1, hidden=(8,))
    with pytest.raises(ValueError, match="needs a context"):
        net.sampling_field()
    with pytest.raises(ValueError, match="x_t must be"):
        net.sampling_field(torch.zeros(1))(0.5, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"needs a context \(1,\) or \(n, 1\), got \(5, 4\)"):
        net.sampling_field(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="context has 5 rows, x_t 3"):
        net.sampling_field(torch.zeros(5, 1))(0.5, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="unconditional"):
        VelocityMLP(2, hidden=(8,)).sampling_field(torch.zeros(3))
    residual_first = VelocityMLP(2, context_dim=5, hidden=(16,), residual=True)  # inputs 9 + 2 + 5 = 16 wide
    with pytest.raises(ValueError, match="bfloat16 sampling_field runs on"):
        residual_first.sampling_field(torch.zeros(5), bf16=True)
    with torch.no_grad():  # fp32: the plain forward
        torch.testing.assert_close(residual_first.sampling_field(torch.zeros(5))(0.5, torch.ones(4, 2)),
                                   residual_first(0.5, torch.ones(4, 2), torch.zeros(5)))


@pytest.mark.parametrize("context_dim", [0, 2])
def test_bf16_sampler_moves_samples_little(context_dim):
    """OdeConfig(mixed_precision="bf16") samples from the same noise as float32 to within ~1e-4 of their spread
    (measured; a smooth random field, RK4)."""
    torch.manual_seed(0)
    net = VelocityMLP(2, context_dim=context_dim, hidden=(64, 64, 64))
    context = torch.randn(context_dim) if context_dim else None
    draws = {}
    for precision in ("off", "bf16"):
        cnf = CNF(net, 2, context_dim=context_dim, sampler=OdeConfig("rk4", steps=8, mixed_precision=precision))
        torch.manual_seed(1)
        draws[precision] = cnf.sample(N_BLOCKED, context)
    assert draws["bf16"].dtype == torch.float32
    error = (draws["bf16"] - draws["off"]).abs().max(0).values / draws["off"].std(0)
    assert (error > 0).all() and (error < 2e-3).all()


def test_bf16_sampler_for_other_fields_runs_under_autocast():
    """A field that is not a VelocityMLP gets its bf16 products from an autocast; the state stays float32."""
    seen = []

    class Recording(Linear):
        def forward(self, t, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(t, x)

    cnf = CNF(Recording(), 2, sampler=OdeConfig("rk4", steps=2, mixed_precision="bf16"))
    assert cnf.sample(4).dtype == torch.float64 and seen == [True] * 8


def test_mixed_precision_options_are_checked():
    with pytest.raises(ValueError, match="mixed_precision must be"):
        OdeConfig(mixed_precision="fp16")
    with pytest.raises(ValueError, match="likelihood ODE integrates in the model's dtype"):
        CNF(VelocityMLP(2), 2, likelihood=OdeConfig(mixed_precision="bf16"))


def test_sample_and_log_prob_run_in_the_models_dtype_under_autocast():
    """A caller's bf16 autocast (e.g. a mixed-precision loss around it) changed log q by ~1e-4: it is off inside."""
    cnf = CNF(VelocityMLP(2, context_dim=3, hidden=(32, 32)), 2, context_dim=3,
              sampler=OdeConfig(method="rk4", steps=5), likelihood=OdeConfig(method="rk4", steps=5))
    context = torch.randn(3)
    torch.manual_seed(0)
    x = cnf.sample(6, context)
    log_q = cnf.log_prob(x, context)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        torch.testing.assert_close(cnf.sample(6, context), x)
        torch.testing.assert_close(cnf.log_prob(x, context), log_q)


@pytest.mark.gpu
def test_bf16_sampler_on_cuda_stays_near_float32():
    """On CUDA, mixed_precision="bf16" samples this fixed-step VelocityMLP through the fused kernel's bf16 mode (with
    TF32 first and output layers; tests/fm/test_fused_ode.py checks the path) and "auto" stays float32 there: draws
    from the same noise within 5e-3 of their spread (the autocast path measured on CPU: 2-3e-4)."""
    torch.manual_seed(0)
    net = VelocityMLP(2, context_dim=2, hidden=(64, 64, 64)).cuda()
    context = torch.randn(2, device="cuda")
    draws = {}
    for precision in ("off", "auto", "bf16"):
        cnf = CNF(net, 2, context_dim=2, sampler=OdeConfig("rk4", steps=8, mixed_precision=precision))
        torch.manual_seed(1)
        draws[precision] = cnf.sample(N_BLOCKED, context)
    torch.testing.assert_close(draws["auto"], draws["off"])
    error = (draws["bf16"] - draws["off"]).abs().max(0).values / draws["off"].std(0)
    assert draws["bf16"].dtype == torch.float32 and (error > 0).all() and (error < 5e-3).all()
