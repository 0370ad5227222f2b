"""Divergences: the forward-mode MLP trace against the autograd references (exact and Hutchinson, values and
gradients, every activation, residual layers, contexts, blocks), the Hutchinson estimate's unbiasedness, the
probes' plumbing through the CNF's adaptive solve, and bad input."""

import itertools

import pytest
import torch

import fastflow.fm.divergence as divergence_module
from fastflow.fm import (CNF, DIVERGENCES, ExactDivergence, HutchinsonDivergence, OdeConfig, VelocityMLP,
                         exact_divergence, hutchinson_divergence, mlp_divergence)


def _field(dim=3, context_dim=0, hidden=(16, 16, 12), dtype=torch.float64, **options):
    torch.manual_seed(0)
    return VelocityMLP(dim, context_dim=context_dim, hidden=hidden, **options).to(dtype)


def _inputs(field, n=40, dtype=torch.float64):
    torch.manual_seed(1)
    x = torch.randn(n, field.dim, dtype=dtype)
    t = torch.rand(n, dtype=dtype)
    args = (torch.randn(n, field.context_dim, dtype=dtype),) if field.context_dim else ()
    return t, x, args


def _sign_patterns(n, dim, dtype=torch.float64):
    """Every Rademacher vector, `(n, 2^D, D)`: their mean of εᵀ J ε is tr J exactly."""
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=dim)), dtype=dtype).expand(n, -1, -1)


@pytest.mark.parametrize("activation", ["silu", "tanh", "gelu", "relu"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("context_dim", [0, 4])
def test_forward_mode_matches_autograd_in_float64(activation, residual, context_dim):
    """(16, 16, 12) hidden widths: the residual option joins the second layer only."""
    field = _field(context_dim=context_dim, activation=activation, residual=residual)
    t, x, args = _inputs(field)
    v_ref, div_ref = exact_divergence(field, t, x, *args)
    v, div = mlp_divergence(field, t, x, *args)
    torch.testing.assert_close(v, v_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(div, div_ref, atol=1e-12, rtol=0)
    probes = HutchinsonDivergence(num_probes=3, noise="gaussian").draw(x)
    _, estimate_ref = hutchinson_divergence(field, t, x, *args, probes=probes)
    _, estimate = mlp_divergence(field, t, x, *args, probes=probes)
    torch.testing.assert_close(estimate, estimate_ref, atol=1e-12, rtol=0)


def test_a_residual_first_layer():
    """Inputs as wide as the first hidden layer (9 time features + 3 = 12): x's tangents enter the residual sum."""
    field = _field(hidden=(12, 12), residual=True)
    t, x, _ = _inputs(field)
    torch.testing.assert_close(mlp_divergence(field, t, x)[1], exact_divergence(field, t, x)[1], atol=1e-12, rtol=0)


def test_float32_within_stated_tolerance():
    """float32 forward-mode against the float64 reference: relative 1e-5 of the trace's scale."""
    field = _field(dim=10, context_dim=5, hidden=(64, 64, 64))
    t, x, args = _inputs(field, n=200)
    _, div_ref = exact_divergence(field, t, x, *args)
    _, div = mlp_divergence(field.float(), t.float(), x.float(), *(a.float() for a in args))
    torch.testing.assert_close(div.double(), div_ref, atol=1e-5 * div_ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_without_autograd_as_with_it(mode):
    field = _field(context_dim=2)
    t, x, args = _inputs(field)
    expected = mlp_divergence(field, t, x, *args)
    with mode():
        v, div = mlp_divergence(field, t, x, *args)
    torch.testing.assert_close(v, expected[0].detach(), atol=0, rtol=0)
    torch.testing.assert_close(div, expected[1].detach(), atol=1e-15, rtol=0)


def test_blocks_of_rows_give_the_one_block_answer(monkeypatch):
    field = _field(context_dim=2)
    t, x, args = _inputs(field, n=101)
    expected = mlp_divergence(field, t, x, *args)
    monkeypatch.setattr(divergence_module, "CPU_BLOCK_ELEMENTS", 7 * field.dim * 16)  # 7 rows a block
    for got, want in zip(mlp_divergence(field, t, x, *args), expected):
        torch.testing.assert_close(got, want, atol=1e-15, rtol=0)


def test_gradients_match_autograd_through_the_reference():
    """d div / d(x, parameters) by backpropagating through the forward-mode products, against the reference's
    double backward."""
    field = _field(context_dim=2, activation="tanh")
    t, x, args = _inputs(field, n=10)
    weights = torch.randn(10, dtype=torch.float64)

    def gradients(divergence):
        x_in = x.clone().requires_grad_(True)
        v, div = divergence(field, t, x_in, *args)
        loss = (div * weights).sum() + v.square().sum()
        return torch.autograd.grad(loss, [x_in, *field.parameters()])

    for got, want in zip(gradients(mlp_divergence), gradients(exact_divergence)):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-9)


def test_every_sign_pattern_averages_to_the_exact_trace():
    """Hutchinson's estimate is unbiased: over all 2^D Rademacher vectors it is the trace itself."""
    field = _field()
    t, x, _ = _inputs(field)
    probes = _sign_patterns(x.shape[0], field.dim)
    torch.testing.assert_close(mlp_divergence(field, t, x, probes=probes)[1], exact_divergence(field, t, x)[1],
                               atol=1e-12, rtol=0)


def test_gaussian_probes_average_to_the_exact_trace():
    """The mean of 4,000 Gaussian-probe estimates against the trace, within 5 standard errors (the spread of
    200 single-probe estimates)."""
    field = _field(dim=4)
    t, x, _ = _inputs(field, n=5)
    torch.manual_seed(2)
    many, single = HutchinsonDivergence(num_probes=4000, noise="gaussian"), HutchinsonDivergence(noise="gaussian")
    mean = mlp_divergence(field, t, x, probes=many.draw(x))[1]
    spread = torch.stack([mlp_divergence(field, t, x, probes=single.draw(x))[1] for _ in range(200)]).std(0)
    assert ((mean - exact_divergence(field, t, x)[1]).abs() < 5 * spread / 4000 ** 0.5).all()


class _AllSigns:
    """A Divergence drawing every sign pattern: Hutchinson's code path with the exact answer."""

    def draw(self, x):
        return _sign_patterns(x.shape[0], x.shape[1], x.dtype).contiguous()

    def __call__(self, velocity, t, x, *args, probes=None):
        return HutchinsonDivergence()(velocity, t, x, *args, probes=probes)


def test_probes_follow_their_rows_through_adaptive_steps():
    """The CNF draws probes once per solve and passes them with the context, sliced as dopri5 drops finished rows:
    with every sign pattern the log-density is the exact one."""
    field = _field(dim=3, context_dim=2, hidden=(16, 16))
    x, context = torch.randn(30, 3, dtype=torch.float64) * 2, torch.randn(30, 2, dtype=torch.float64)
    likelihood = OdeConfig(rtol=1e-8, atol=1e-8)
    exact = CNF(field, 3, context_dim=2, likelihood=likelihood).log_prob(x, context)
    estimated = CNF(field, 3, context_dim=2, likelihood=likelihood, divergence=_AllSigns()).log_prob(x, context)
    torch.testing.assert_close(estimated, exact, atol=1e-6, rtol=0)


def test_hutchinson_log_prob_is_unbiased():
    """50 solves with one Rademacher probe each: their mean log q within 5 standard errors of the exact one."""
    field = _field(dim=2, hidden=(16, 16))
    x = torch.randn(8, 2, dtype=torch.float64)
    exact = CNF(field, 2).log_prob(x).detach()
    cnf = CNF(field, 2, divergence="hutchinson")
    torch.manual_seed(3)
    with torch.no_grad():
        draws = torch.stack([cnf.log_prob(x) for _ in range(50)])
    assert draws.std(0).min() > 0  # (the estimate does vary)
    assert ((draws.mean(0) - exact).abs() < 5 * draws.std(0) / 50 ** 0.5).all()


def test_registry_and_defaults():
    assert isinstance(DIVERGENCES["exact"], ExactDivergence)
    assert DIVERGENCES["hutchinson"] == HutchinsonDivergence(num_probes=1, noise="rademacher")
    probes = HutchinsonDivergence(num_probes=6).draw(torch.zeros(4, 3))
    assert probes.shape == (4, 6, 3) and probes.dtype == torch.float32 and set(probes.unique().tolist()) == {-1.0, 1.0}


def test_bad_input():
    field = _field()
    t, x, _ = _inputs(field, n=4)
    with pytest.raises(ValueError, match="probes must be"):
        mlp_divergence(field, t, x, probes=torch.ones(4, 3))
    with pytest.raises(ValueError, match="probes must be"):
        mlp_divergence(field, t, x, probes=torch.ones(4, 0, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="probes must be"):
        hutchinson_divergence(field, t, x, probes=torch.ones(4, 1, 3))  # float32 against float64 x
    with pytest.raises(ValueError, match="num_probes"):
        HutchinsonDivergence(num_probes=0)
    with pytest.raises(ValueError, match="noise"):
        HutchinsonDivergence(noise="uniform")
    with pytest.raises(ValueError, match="needs the probes"):
        HutchinsonDivergence()(field, t, x)
    with pytest.raises(TypeError, match="divergence must be"):
        CNF(field, 3, divergence=42)


def test_a_plain_divergence_function_as_before():
    """`(velocity, t, x, *args) -> (v, div)` was the documented interface: such functions (exact_divergence itself)
    were refused once divergences drew probes."""
    field = _field(context_dim=2, hidden=(16, 16))
    x, context = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    expected = CNF(field, 3, context_dim=2).log_prob(x, context)
    torch.testing.assert_close(CNF(field, 3, context_dim=2, divergence=exact_divergence).log_prob(x, context), expected)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_empty_batches(divergence):
    """Two hidden layers: the tangents' GEMM could not reshape 0 rows (-1 was ambiguous)."""
    field = _field(context_dim=2, hidden=(16, 16))
    v, div = DIVERGENCES[divergence](field, torch.tensor(0.5, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64),
                                     torch.zeros(2, dtype=torch.float64),
                                     probes=torch.zeros(0, 1, 3, dtype=torch.float64))
    assert v.shape == (0, 3) and div.shape == (0,)
    assert CNF(field, 3, context_dim=2, divergence=divergence).log_prob(torch.zeros(0, 3, dtype=torch.float64),
                                                                       torch.zeros(2, dtype=torch.float64)).shape == (0,)


class _TimedLinear(torch.nn.Module):
    """v = t A x: div v = t tr A, log q(x) = log N(e^{-A/2} x; 0, I) - tr(A) / 2."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[0.3, 0.1, 0.0], [-0.2, 0.1, 0.4], [0.0, 0.2, -0.5]], dtype=torch.float64))

    def forward(self, t, x):
        return t * (x @ self.A.T)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_autograd_references_under_inference_mode(divergence):
    """The solver's times are inference tensors there, and a field t * x saves them for the backward pass: the
    references failed ("Inference tensors cannot be saved for backward")."""
    field = _TimedLinear()
    x = torch.randn(6, 3, dtype=torch.float64)
    expected = (torch.distributions.Normal(0.0, 1.0).log_prob(x @ torch.linalg.matrix_exp(-field.A.detach() / 2).T).sum(-1)
                - field.A.detach().trace() / 2)
    cnf = CNF(field, 3, likelihood=OdeConfig(rtol=1e-9, atol=1e-9),
              divergence=_AllSigns() if divergence == "hutchinson" else divergence)
    with torch.inference_mode():
        torch.testing.assert_close(cnf.log_prob(x), expected, atol=1e-7, rtol=0)


def test_a_subclass_with_its_own_forward_goes_through_autograd():
    """The forward mode rebuilds v from the layers: a subclass's forward (or a hook) was skipped."""
    class Scaled(VelocityMLP):
        def forward(self, t, x_t, context=None):
            return 2 * super().forward(t, x_t, context)

    torch.manual_seed(0)
    field = Scaled(2, hidden=(16,)).double()
    t, x = torch.rand(5, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    for divergence in (ExactDivergence(), lambda *a: HutchinsonDivergence()(*a, probes=_sign_patterns(5, 2))):
        v, div = divergence(field, t, x)
        v_ref, div_ref = exact_divergence(field, t, x)
        torch.testing.assert_close(v, v_ref)
        torch.testing.assert_close(div, div_ref)
    plain = _field(dim=2)
    plain.register_forward_hook(lambda module, inputs, output: 2 * output)
    torch.testing.assert_close(ExactDivergence()(plain, t, x)[1], exact_divergence(plain, t, x)[1])


@pytest.mark.gpu
def test_on_cuda_as_on_the_cpu():
    """Large blocks on GPUs (GPU_BLOCK_ELEMENTS): the same values as the CPU's blocks, float64."""
    field = _field(dim=10, context_dim=3, hidden=(64, 64, 64))
    t, x, args = _inputs(field, n=3000)
    expected = mlp_divergence(field, t, x, *args)
    got = mlp_divergence(field.cuda(), t.cuda(), x.cuda(), *(a.cuda() for a in args))
    for value, want in zip(got, expected):
        torch.testing.assert_close(value.cpu(), want, atol=1e-12, rtol=0)
