"""Unconditional flow matching on the 2-D 8-Gaussians: fastflow's minibatch OT pairing (`cfm_loss(pairing="ot")`,
exact assignments in blocks of 64 rows) against independent pairing, and against torchcfm's
ConditionalFlowMatcher / ExactOptimalTransportConditionalFlowMatcher (POT's exact plan over the whole batch, pairs
drawn from it with replacement), sigma = 0 everywhere. Every row trains the same VelocityMLP (3x128) with the same
seed, data, batches, epochs and `fastflow.train.fit` loop, so training seconds differ by the pairing alone. Each
model then draws 10^4 samples with fastflow's solvers: C2ST against exact samples, velocity evaluations, seconds.
Ratios: training seconds against torchcfm's OT row; sampling seconds of each model's cheapest sampler with
C2ST <= 0.55 against the independent-pairing model's.

Run: `python -m pytest bench/bench_fm.py --benchmark-only -s` (1 thread; FASTFLOW_BENCH_FM_EPOCHS, default 60).
torchcfm (with POT) comes from the `bench` extra; without it, its rows are left out.
"""

import importlib.util
import math
import os
import time

import torch

from fastflow import set_num_threads
from fastflow.fm import CNF, OdeConfig, VelocityMLP, cfm_loss, get_path
from fastflow.metrics import c2st
from fastflow.train import fit

THREADS = int(os.environ.get("FASTFLOW_BENCH_THREADS", "1"))
EPOCHS = int(os.environ.get("FASTFLOW_BENCH_FM_EPOCHS", "60"))
SAMPLES = 10_000
SAMPLERS = {"euler-4": OdeConfig("euler", steps=4), "euler-10": OdeConfig("euler", steps=10),
            "dopri5 1e-5": OdeConfig("dopri5", rtol=1e-5, atol=1e-5)}
ACCURATE = 0.55


def eight_gaussians(n: int, seed: int) -> torch.Tensor:
    """`(n, 2)` draws: equal-weight Gaussians (std 0.2) on the circle of radius 2."""
    generator = torch.Generator().manual_seed(seed)
    angles = 2 * math.pi * torch.randint(0, 8, (n,), generator=generator) / 8
    return 2.0 * torch.stack([angles.cos(), angles.sin()], -1) + 0.2 * torch.randn(n, 2, generator=generator)


def _losses():
    path = get_path("ot")
    losses = {
        "fastflow independent": lambda model, x_1: cfm_loss(model, path, x_1),
        "fastflow ot": lambda model, x_1: cfm_loss(model, path, x_1, pairing="ot"),
    }
    if importlib.util.find_spec("torchcfm") is not None:
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher, ExactOptimalTransportConditionalFlowMatcher

        def torchcfm_loss(matcher):
            def loss(model, x_1):
                t, x_t, u_t = matcher.sample_location_and_conditional_flow(torch.randn_like(x_1), x_1)
                return (model(t, x_t) - u_t).square().sum(-1).mean()
            return loss

        losses["torchcfm independent"] = torchcfm_loss(ConditionalFlowMatcher(sigma=0.0))
        losses["torchcfm ot"] = torchcfm_loss(ExactOptimalTransportConditionalFlowMatcher(sigma=0.0))
    return losses


def _sample(net, sampler):
    cnf = CNF(net, 2, sampler=sampler)
    torch.manual_seed(1)
    start = time.perf_counter()
    samples = cnf.sample(SAMPLES)
    return samples, time.perf_counter() - start, cnf.last_evaluations


def test_flow_matching_pairing(benchmark):
    set_num_threads(THREADS)
    data, exact = eight_gaussians(20_000, 0), eight_gaussians(SAMPLES, 1)
    rows = {}

    def train(loss):
        torch.manual_seed(0)
        net = VelocityMLP(2, hidden=(128, 128, 128))
        start = time.perf_counter()
        fit(net, loss, (data,), batch_size=256, learning_rate=2e-3, max_epochs=EPOCHS, validation_fraction=0.0,
            lr_schedule="cosine", progress=False)
        return net.requires_grad_(False), time.perf_counter() - start

    for name, loss in _losses().items():
        net, seconds = benchmark.pedantic(train, args=(loss,), rounds=1, iterations=1) if name == "fastflow ot" else train(loss)
        sampled = {}
        for sampler_name, sampler in SAMPLERS.items():
            samples, sample_seconds, evaluations = _sample(net, sampler)
            sampled[sampler_name] = {"c2st": c2st(exact, samples), "seconds": sample_seconds, "evaluations": evaluations}
        rows[name] = {"train_seconds": seconds, "samplers": sampled}

    def cheapest_accurate(row):
        accurate = [s for s in row["samplers"].values() if s["c2st"] <= ACCURATE]
        return min(accurate, key=lambda s: s["seconds"], default=None)

    anchor_name = "torchcfm ot" if "torchcfm ot" in rows else "fastflow ot"  # (torchcfm from the `bench` extra)
    train_anchor = rows[anchor_name]["train_seconds"]
    sample_anchor = cheapest_accurate(rows["fastflow independent"])
    lines = [f"\nFlow matching on 8-Gaussians, {EPOCHS} epochs of 20,000 (batch 256), {SAMPLES} samples, {THREADS} thread(s)"]
    for name, row in rows.items():
        best = cheapest_accurate(row)
        speedup = (f"{sample_anchor['seconds'] / best['seconds']:5.2f}x" if best and sample_anchor else "  n/a")
        lines.append(f"  {name:22s} train {row['train_seconds']:6.1f} s ({train_anchor / row['train_seconds']:4.2f}x "
                     f"{anchor_name})  cheapest sampler with C2ST <= {ACCURATE}: {speedup} the independent model's")
        lines += [f"      {sampler:12s} C2ST {s['c2st']:.3f}  {s['evaluations']:4d} evals  {s['seconds']:6.3f} s"
                  for sampler, s in row["samplers"].items()]
    print("\n".join(lines))
    benchmark.extra_info.update(rows)
