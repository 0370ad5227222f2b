"""Flows: invertibility, log-determinants against autograd Jacobians, normalization, shapes, bad input."""

import math

import numpy as np
import pytest
import torch

from fastflow.flows import (
    AffineCoupling,
    BoxToReal,
    FlowConfig,
    GaussianMixture,
    LULinear,
    RandomPermutation,
    ReversePermutation,
    SplineCoupling,
    Standardize,
    build_flow,
)
from fastflow.ops.spline import rq_spline_ref


def _perturb(module, scale=0.2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


TRANSFORMS = [
    lambda: SplineCoupling(3, 2, num_bins=6, bound=3.0),
    lambda: SplineCoupling(3, 2, flip=True, num_bins=6, bound=3.0),
    lambda: SplineCoupling(1, 2, num_bins=4),
    lambda: AffineCoupling(4, 2),
    lambda: AffineCoupling(5, 2, flip=True),
    lambda: LULinear(3),
    lambda: ReversePermutation(3),
    lambda: RandomPermutation(3, seed=3),
    lambda: Standardize(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 0.5, 1.5])),
    lambda: BoxToReal(-torch.ones(3), torch.tensor([1.0, 2.0, 3.0])),
]


@pytest.mark.parametrize("make", TRANSFORMS)
def test_inverse_and_log_det_match_autograd_jacobian(make):
    transform = _perturb(make().double())
    dim = next(b for b in transform.buffers()).numel() if not list(transform.parameters()) else None
    dim = getattr(transform, "dim", None) or dim or 3
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    if isinstance(transform, BoxToReal):
        x = -1 + torch.rand(6, dim, generator=generator, dtype=torch.float64) * (transform.high - transform.low).double()
    else:
        x = 2.5 * torch.randn(6, dim, generator=generator, dtype=torch.float64)  # reaches the spline tails
    z, ladj = transform(x, context)
    x_back, inverse_ladj = transform.inverse(z, context)
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(inverse_ladj, -ladj, atol=1e-9, rtol=1e-9)
    for i in range(x.shape[0]):
        jacobian = torch.autograd.functional.jacobian(lambda v: transform(v[None], context[i : i + 1])[0][0], x[i])
        torch.testing.assert_close(ladj[i], torch.linalg.slogdet(jacobian)[1], atol=1e-9, rtol=1e-9)


def test_box_to_real_gives_zero_density_outside_its_box():
    """The clamp that keeps faces finite made the density outside the box constant along each axis (a flow's
    log_prob of a point past `high` was finite: its density did not integrate to 1)."""
    box = BoxToReal(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 2.0]))
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.5, 1.0], [0.0, -0.1], [-3.0, 5.0]])
    _, ladj = box(x)
    assert torch.isfinite(ladj[:2]).all()  # inside, and on the faces
    assert (ladj[2:] == -math.inf).all()


def test_box_to_real_inverse_stays_inside_its_box():
    """low + width·sigmoid(u) in float32 rounded one step past high once sigmoid(u) rounds to 1 (U(-3.7, -0.3): u >= 16.6
    gave -0.29999995 > -0.30000001, a posterior draw its own log_prob put at -inf)."""
    low, high = torch.tensor([-3.7, -1.1, 0.1]), torch.tensor([-0.3, 0.3, 2.9])
    x, _ = BoxToReal(low, high).inverse(torch.tensor([[40.0, 40.0, 40.0], [-40.0, -40.0, -40.0], [17.0, 20.0, -17.0]]))
    assert ((x >= low) & (x <= high)).all(), x


def test_box_to_real_with_one_sided_and_open_coordinates():
    """Coordinates bounded on one side map by log(x - low) or log(high - x), unbounded ones pass through (a prior
    with a lone finite bound got no map, and its posterior's draws left the support); inverse, log-determinant
    against autograd's Jacobian, the faces finite and points outside at density 0."""
    box = BoxToReal(torch.tensor([-1.0, 0.0, -math.inf, -math.inf]), torch.tensor([1.0, math.inf, 2.0, math.inf])).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    x = torch.stack([x[:, 0].tanh(), x[:, 1].exp(), 2 - x[:, 2].exp(), 3 * x[:, 3]], 1)
    u, ladj = box(x)
    x_back, inverse_ladj = box.inverse(u)
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(inverse_ladj, -ladj, atol=1e-12, rtol=1e-12)
    for i in range(x.shape[0]):
        jacobian = torch.autograd.functional.jacobian(lambda v: box(v[None])[0][0], x[i])
        torch.testing.assert_close(ladj[i], torch.linalg.slogdet(jacobian)[1], atol=1e-12, rtol=1e-12)
    _, face_ladj = box(torch.tensor([[1.0, 0.0, 2.0, 0.0]], dtype=torch.float64))
    assert torch.isfinite(face_ladj).all()
    _, outside = box(torch.tensor([[0.0, -0.1, 0.0, 0.0], [0.0, 1.0, 2.5, 0.0]], dtype=torch.float64))
    assert (outside == -math.inf).all()
    inside, _ = box.inverse(torch.tensor([[-50.0, -50.0, 50.0, 7.0]], dtype=torch.float64))
    assert ((inside[0, :3] >= torch.tensor([-1.0, 0.0, -1e300])) & (inside[0, :3] <= torch.tensor([1.0, 1e300, 2.0]))).all()
    u = torch.tensor([[100.0, -3.0, 1.0, 0.5]], requires_grad=True)  # (exp(100) is inf in float32: unused)
    box.float().inverse(u)[0].sum().backward()
    assert torch.isfinite(u.grad).all()


def test_spline_is_identity_in_tails_and_monotone():
    params = torch.randn(1, 1, 3 * 5 - 1, dtype=torch.float64).expand(2001, 1, -1)
    x = torch.linspace(-4, 4, 2001, dtype=torch.float64)[:, None]
    y, ladj = rq_spline_ref(x, params, bound=2.0)
    tails = x.abs() > 2.0
    torch.testing.assert_close(y[tails], x[tails])
    assert (ladj[tails] == 0).all()
    assert (y[1:] > y[:-1]).all()
    inside = x.abs() <= 2.0
    assert (y[inside].abs() <= 2.0 + 1e-12).all()


def test_spline_gradcheck_float64():
    generator = torch.Generator().manual_seed(0)
    x = (1.5 * torch.randn(5, 2, generator=generator, dtype=torch.float64)).requires_grad_()
    params = torch.randn(5, 2, 3 * 4 - 1, generator=generator, dtype=torch.float64).requires_grad_()
    for inverse in (False, True):
        assert torch.autograd.gradcheck(lambda a, b: rq_spline_ref(a, b, bound=2.0, inverse=inverse), (x, params))


def _grid_mass(log_prob, half_width=8.0, points=401):
    axis = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    cell = (axis[1] - axis[0]) ** 2
    return float(log_prob(grid).exp().sum() * cell)


@pytest.mark.parametrize(
    "config",
    [FlowConfig(num_layers=3), FlowConfig(transform="affine", permutation="lu"), FlowConfig(base="gmm", num_components=3)],
)
def test_log_prob_integrates_to_one_on_a_grid(config):
    flow = _perturb(build_flow(config, 2, 1).double(), scale=0.1)
    for c in (-1.0, 0.7):
        context = torch.tensor([c], dtype=torch.float64)
        with torch.no_grad():
            mass = _grid_mass(lambda g: flow.log_prob(g, context))
        assert abs(mass - 1.0) < 5e-3, mass


def test_shapes_and_broadcasting():
    flow = build_flow(FlowConfig(num_layers=2), 3, 2)
    contexts = torch.randn(4, 2)
    assert flow.sample(7, contexts[0]).shape == (7, 3)
    draws = flow.sample(7, contexts)
    assert draws.shape == (7, 4, 3)
    assert flow.log_prob(draws, contexts).shape == (7, 4)
    assert flow.log_prob(draws[:, 1], contexts[1]).shape == (7,)
    torch.testing.assert_close(flow.log_prob(draws, contexts)[:, 1], flow.log_prob(draws[:, 1], contexts[1]))
    theta, log_q = flow.sample_and_log_prob(5, contexts)
    torch.testing.assert_close(log_q, flow.log_prob(theta, contexts), atol=1e-4, rtol=1e-4)
    assert flow.rsample(3, contexts[0]).requires_grad


def test_flow_moves_with_dtype_and_device():
    flow = build_flow(FlowConfig(num_layers=2, base="gmm"), 2, 1).to("cpu", torch.float64)
    assert flow.sample(3, torch.zeros(1, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.gpu
def test_flow_on_cuda():
    flow = build_flow(FlowConfig(num_layers=2), 2, 1).to("cuda")
    draws = flow.sample(10, torch.zeros(1, device="cuda"))
    assert draws.device.type == "cuda"
    assert torch.isfinite(flow.log_prob(draws, torch.zeros(1, device="cuda"))).all()


def test_gaussian_mixture_base_moments():
    base = GaussianMixture(2, 2)
    with torch.no_grad():
        base.means.copy_(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]))
        base.logits.copy_(torch.tensor([0.0, math.log(3.0)]))
    torch.manual_seed(0)
    draws = base.rsample(200_000)
    assert abs(float(draws[:, 0].mean()) - 1.0) < 0.02  # 0.25·(-2) + 0.75·2
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = 0.75 * normal.cdf(torch.tensor(2.0)) + 0.25 * normal.cdf(torch.tensor(-2.0))
    assert abs(float((draws[:, 0] > 0).float().mean()) - float(positive)) < 0.005  # binomial sd ≈ 0.001
    assert abs(_grid_mass(base.log_prob) - 1.0) < 1e-3


@pytest.mark.parametrize("dim", [2, 10, 50])
def test_gaussian_mixture_means_start_about_two_apart_in_any_dimension(dim):
    """With spread 1 the initial means were √(2·dim) apart on average (4.5 in 10-D): a unimodal posterior was split
    over far-apart components. Their mean squared distance is 2·dim·spread² = 4 now (spread √(2/dim), at most 1)."""
    means = GaussianMixture(dim, 400).means.detach()
    squared = torch.cdist(means, means).square()
    assert 3.5 < float(squared.sum() / (400 * 399)) < 4.5


def test_bad_input_is_rejected():
    flow = build_flow(FlowConfig(num_layers=2), 2, 3)
    with pytest.raises(ValueError, match="last dimension"):
        flow.log_prob(torch.zeros(4, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="context"):
        flow.log_prob(torch.zeros(4, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="context"):
        flow.sample(4)
    with pytest.raises(ValueError, match="positive"):
        flow.sample(0, torch.zeros(3))
    with pytest.raises(ValueError, match="broadcast"):
        flow.log_prob(torch.zeros(4, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="θ is torch.float64 but the flow's parameters are torch.float32"):
        flow.log_prob(torch.zeros(4, 2, dtype=torch.float64), torch.zeros(3))  # (torch's mat1/mat2 error inside)
    with pytest.raises(ValueError, match="transform"):
        FlowConfig(transform="maf")
    with pytest.raises(ValueError, match="num_bins"):
        FlowConfig(num_bins=0)
    for options in (dict(num_layers=2.5), dict(hidden=32.0), dict(num_bins=True)):  # (obscure TypeErrors, or 1 bin)
        with pytest.raises(ValueError, match="must be a positive int"):
            FlowConfig(**options)
    assert type(FlowConfig(num_layers=np.int64(3)).num_layers) is int  # (saved configs are JSON)
    assert type(FlowConfig(bound=np.float64(3.0)).bound) is float  # (a numpy bound made saved posteriors unloadable)
    for make in (lambda: FlowConfig(num_bins=1000), lambda: SplineCoupling(2, num_bins=1000)):
        with pytest.raises(ValueError, match="num_bins must be at most 999"):  # (negative widths: no bijection)
            make()
    for bound in (0.0, math.nan, math.inf):  # a NaN bound made every spline the identity
        with pytest.raises(ValueError, match="bound must be a finite positive"):
            FlowConfig(bound=bound)


def test_lu_linear_starts_as_the_identity():
    """Its diagonal started at 1.001 (softplus(raw) = 1 plus the minimum 1e-3), not at the documented identity."""
    x = torch.randn(5, 3)
    z, ladj = LULinear(3)(x)
    torch.testing.assert_close(z, x, rtol=1e-6, atol=0)
    assert ladj.abs().max() < 1e-6


@pytest.mark.parametrize("permutation", ["reverse", "random", "lu"])
def test_every_coordinate_depends_on_the_context(permutation):
    flow = _perturb(build_flow(FlowConfig(num_layers=2, permutation=permutation, transform="affine"), 5, 1).double(), 0.1)
    theta = torch.randn(1, 5, dtype=torch.float64)

    def latent(context):
        z = theta
        for transform in flow.transforms:
            z, _ = transform(z, context[None])
        return z[0]

    sensitivity = torch.autograd.functional.jacobian(latent, torch.zeros(1, dtype=torch.float64))
    assert (sensitivity.abs().squeeze(-1) > 1e-6).all()


def test_mixture_base_samples_an_empty_batch_of_contexts():
    """GaussianMixture.rsample(0) called multinomial with 0 draws (raised): NPE's default base could not sample
    x of shape (0, C)."""
    flow = build_flow(FlowConfig(base="gmm"), 2, 3)
    assert flow.sample(4, torch.zeros(0, 3)).shape == (4, 0, 2)


def test_flows_refuse_scalar_theta_and_complex_contexts():
    flow = build_flow(FlowConfig(), 1, 2)
    with pytest.raises(ValueError, match="last dimension 1"):
        flow.log_prob(torch.tensor(0.5), torch.zeros(2))
    with pytest.raises(TypeError, match="context must be real"):
        flow.log_prob(torch.zeros(3, 1), torch.zeros(3, 2) + 1j)
