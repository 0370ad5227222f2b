"""Minibatch OT pairing: the exact assignment per block (against brute force), a reordering of the noise, and
straighter learned paths (few Euler steps land closer to the target than with independent pairing)."""

import itertools

import pytest
import torch

from fastflow.fm import CNF, OdeConfig, VelocityMLP, cfm_loss, get_path, ot_pairing
from fastflow.train import fit


def _cost(x_0, x_1):
    return (x_0 - x_1).square().sum().item()


def test_each_block_gets_the_optimal_assignment():
    generator = torch.Generator().manual_seed(0)
    x_0, x_1 = torch.randn(10, 2, generator=generator), 3 * torch.randn(10, 2, generator=generator)
    paired = ot_pairing(x_0, x_1, block_size=4)  # blocks of rows 0-3, 4-7 and the remainder 8-9
    for block in (slice(0, 4), slice(4, 8), slice(8, 10)):
        noise, data = x_0[block], x_1[block]
        best = min(_cost(noise[list(order)], data) for order in itertools.permutations(range(len(noise))))
        assert _cost(paired[block], data) == pytest.approx(best, rel=1e-6)
        # a reordering of the block's own noise: the noise set, hence its N(0, I) marginal, is unchanged
        assert torch.equal(paired[block].sort(0).values, noise.sort(0).values)
    assert torch.equal(ot_pairing(x_0, x_1, block_size=64).sort(0).values, x_0.sort(0).values)


def test_low_precision_far_data_and_empty_batches():
    """Costs are float64: bfloat16 failed in cdist, and float32 costs of data 1000 away from the noise lost the
    optimum (the squared distances differ in their last bits)."""
    generator = torch.Generator().manual_seed(3)  # (a seed where float32 costs chose a worse assignment)
    x_0, x_1 = torch.randn(6, 2, generator=generator), 1000 + torch.randn(6, 2, generator=generator)
    best = min(_cost(x_0.double()[list(order)], x_1.double()) for order in itertools.permutations(range(6)))
    assert _cost(ot_pairing(x_0, x_1).double(), x_1.double()) == pytest.approx(best, rel=1e-12)
    low = ot_pairing(x_0.bfloat16(), x_1.bfloat16())
    assert low.dtype == torch.bfloat16 and torch.equal(low.sort(0).values, x_0.bfloat16().sort(0).values)
    assert ot_pairing(torch.randn(0, 2), torch.randn(0, 2)).shape == (0, 2)


def test_bad_input():
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="one shape"):
        ot_pairing(x, torch.randn(7, 2))
    with pytest.raises(ValueError, match="block_size"):
        ot_pairing(x, x, block_size=0)
    velocity = VelocityMLP(2, context_dim=1, hidden=(8,))
    with pytest.raises(ValueError, match="unconditional"):
        cfm_loss(velocity, get_path("ot"), x, torch.randn(8, 1), pairing="ot")
    with pytest.raises(ValueError, match="unknown pairing"):
        cfm_loss(velocity, get_path("ot"), x, torch.randn(8, 1), pairing="sinkhorn")
    with pytest.raises(ValueError, match="pairing_block"):
        cfm_loss(velocity, get_path("ot"), x, torch.randn(8, 1), pairing_block=-1)


def _two_modes(n, seed):
    generator = torch.Generator().manual_seed(seed)
    return 2.0 * (2 * torch.randint(0, 2, (n, 1), generator=generator) - 1) + 0.1 * torch.randn(n, 1, generator=generator)


def _wasserstein_1(a, b):
    return (a.sort(0).values - b.sort(0).values).abs().mean().item()


def test_ot_pairing_straightens_the_learned_paths():
    """Modes at ±2 (std 0.1): independent pairing averages crossing paths, so 2 Euler steps land far off (W1
    0.9-1.1 over seeds 0-2); OT pairing's paths are nearly straight (W1 0.33-0.34), and 50 steps reach the target."""
    data, target = _two_modes(4000, 0), _two_modes(4000, 1)
    distances = {}
    for pairing in ("independent", "ot"):
        torch.manual_seed(0)
        net = VelocityMLP(1, hidden=(64, 64))
        fit(net, lambda model, x_1: cfm_loss(model, get_path("ot"), x_1, pairing=pairing), (data,), batch_size=256,
            learning_rate=3e-3, max_epochs=30, validation_fraction=0.0, lr_schedule="cosine", progress=False)
        for steps in (2, 50):
            torch.manual_seed(5)
            samples = CNF(net, 1, sampler=OdeConfig("euler", steps=steps)).sample(4000)
            distances[pairing, steps] = _wasserstein_1(samples, target)
    assert distances["ot", 2] < 0.5 < 0.7 < distances["independent", 2], distances
    assert distances["ot", 50] < 0.25, distances


@pytest.mark.gpu
def test_cuda_tensors_pair_as_on_the_cpu():
    generator = torch.Generator().manual_seed(4)
    x_0, x_1 = torch.randn(150, 3, generator=generator), torch.randn(150, 3, generator=generator)
    paired = ot_pairing(x_0.cuda(), x_1.cuda())
    assert paired.device.type == "cuda" and torch.equal(paired.cpu().sort(0).values, x_0.sort(0).values)
    assert _cost(paired.cpu(), x_1) == pytest.approx(_cost(ot_pairing(x_0, x_1), x_1), rel=1e-9)  # (ties may differ)
