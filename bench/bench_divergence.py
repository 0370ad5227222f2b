"""Divergence of a VelocityMLP (3 hidden layers of 128, SiLU), the work of each evaluation of a CNF's log-likelihood
ODE: fastflow's forward-mode products (`fastflow.fm.mlp_divergence`) against the autograd baselines at d = 2 and 10,
exact and Hutchinson (one Rademacher probe): autograd's loop over dimensions in one piece (`exact_divergence`,
`hutchinson_divergence`) and over chunks of 1,024 points (cache-resident: the fastest eager variant found), and
torch.compile of torch.func's vmap(jacrev) over the same chunks (compiled before the timing). Ratios are against the
fastest baseline of each row. Also fastflow's GEMM rate against torch.mm's on the tangents' GEMM shape, timed in the
same run. Then `CNF.log_prob` of 10^4 points end to end (FMPE's default field: 4 hidden layers of 128, a
10-dimensional context; dopri5 at 1e-5), exact by autograd against exact by forward mode, and Hutchinson.

Run: `python -m pytest bench/bench_divergence.py --benchmark-only -s` (FASTFLOW_BENCH_THREADS, default 1).
"""

import os
from functools import partial

import pytest
import torch

from fastflow import set_num_threads
from fastflow.benchmarks import (DIVERGENCE_CHUNK_ROWS, in_chunks, jacobian_trace, synchronizer, time_call,
                                 without_grad)
from fastflow.fm import CNF, HutchinsonDivergence, VelocityMLP, exact_divergence, hutchinson_divergence, mlp_divergence

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
THREADS = int(os.environ.get("FASTFLOW_BENCH_THREADS", "1"))
WIDTH, LAYERS = 128, 3


def _gemm_flops(n: int, dim: int, tangents: int, net: VelocityMLP) -> float:
    """Multiply-adds x 2 of the forward pass and of the tangents' hidden GEMMs (the first layer's tangents are a
    scaling, the output's a dot product)."""
    forward = sum(layer.in_features * layer.out_features for layer in net.layers) + WIDTH * dim
    return 2.0 * n * (forward + tangents * (LAYERS - 1) * WIDTH * WIDTH)


@pytest.mark.parametrize("n", [4096, 16384, 65536])
@pytest.mark.parametrize("dim", [2, 10])
def test_divergence(benchmark, dim, n):
    set_num_threads(THREADS)
    device = torch.device(DEVICE)
    torch.manual_seed(0)
    net = VelocityMLP(dim, hidden=(WIDTH,) * LAYERS).to(device).requires_grad_(False)
    x, t = torch.randn(n, dim, device=device), torch.full((n,), 0.5, device=device)
    probes = HutchinsonDivergence().draw(x)
    rows = DIVERGENCE_CHUNK_ROWS
    loop = partial(lambda net, t, x: exact_divergence(net, t, x)[1], net)
    probe_loop = partial(lambda net, t, x, probes: hutchinson_divergence(net, t, x, probes=probes)[1], net)
    torch._inductor.config.compile_threads = 1  # (a pool of compile workers ran on beside the timings)
    compiled = torch.compile(partial(jacobian_trace, net), dynamic=False)
    tangent_rows = torch.randn(min(n, 2048) * dim, WIDTH, device=device)
    weight = torch.randn(WIDTH, WIDTH, device=device)
    timed = partial(time_call, device=device, repeats=3)
    with torch.no_grad():
        in_chunks(compiled, (t, x), rows)  # compiles (every chunk has one shape), before any timing
        exact = {
            "autograd loop": timed(lambda: loop(t, x)),
            "autograd loop in chunks": timed(lambda: in_chunks(loop, (t, x), rows)),
            "compiled vmap(jacrev) in chunks": timed(lambda: in_chunks(compiled, (t, x), rows)),
            "fastflow": timed(lambda: mlp_divergence(net, t, x)),
        }
        hutchinson = {
            "autograd": timed(lambda: probe_loop(t, x, probes)),
            "autograd in chunks": timed(lambda: in_chunks(probe_loop, (t, x, probes), rows)),
            "fastflow": timed(lambda: mlp_divergence(net, t, x, probes=probes)),
        }
        mm_seconds = time_call(lambda: torch.mm(tangent_rows, weight), device=device, repeats=20)
        error = (mlp_divergence(net, t, x)[1] - loop(t, x)).abs().max().item()
    best = min(seconds for name, seconds in exact.items() if name != "fastflow")
    best_hutchinson = min(seconds for name, seconds in hutchinson.items() if name != "fastflow")
    mm_rate = 2.0 * tangent_rows.shape[0] * WIDTH * WIDTH / mm_seconds
    rate = _gemm_flops(n, dim, dim, net) / exact["fastflow"]
    benchmark.extra_info.update({
        "device": DEVICE, "threads": THREADS, "exact_seconds": exact, "hutchinson_seconds": hutchinson,
        "max_abs_error_vs_autograd": error,
        "exact_ratio_vs_best_baseline": best / exact["fastflow"],
        "exact_ratio_vs_autograd_loop": exact["autograd loop"] / exact["fastflow"],
        "hutchinson_ratio_vs_best_baseline": best_hutchinson / hutchinson["fastflow"],
        "gflops": rate / 1e9, "mm_gflops": mm_rate / 1e9, "fraction_of_mm": rate / mm_rate,
    })
    print(f"\nd={dim} n={n}: exact " + ", ".join(f"{name} {1e3 * s:.1f} ms" for name, s in exact.items())
          + f" -> {best / exact['fastflow']:.2f}x the best baseline ({exact['autograd loop'] / exact['fastflow']:.2f}x "
          f"the loop); hutchinson {best_hutchinson / hutchinson['fastflow']:.2f}x the best baseline; "
          f"{rate / 1e9:.1f} GFLOP/s = {rate / mm_rate:.0%} of torch.mm's {mm_rate / 1e9:.1f}; max error {error:.1e}")
    benchmark.pedantic(without_grad(lambda: mlp_divergence(net, t, x)), rounds=1, iterations=1,
                       setup=synchronizer(device))


def test_cnf_log_prob(benchmark):
    set_num_threads(THREADS)
    device = torch.device(DEVICE)
    torch.manual_seed(0)
    dim, context_dim, n = 10, 10, 10_000
    velocity = VelocityMLP(dim, context_dim=context_dim, hidden=(WIDTH,) * 4).to(device).requires_grad_(False)
    x, context = torch.randn(n, dim, device=device), torch.randn(context_dim, device=device)
    rows = {}
    with torch.no_grad():
        # a plain function is taken as it is (`as_divergence`): autograd's exact trace for every field, what
        # `CNF.log_prob` computed before the forward mode
        for name, divergence in (("autograd exact", exact_divergence), ("fastflow exact", "exact"),
                                 ("fastflow hutchinson", "hutchinson")):
            cnf = CNF(velocity, dim, context_dim=context_dim, divergence=divergence)
            log_prob = []
            seconds = time_call(lambda: log_prob.append(cnf.log_prob(x, context)), device=device, repeats=1)
            rows[name] = {"seconds": seconds, "evaluations": cnf.last_evaluations, "log_prob": log_prob[-1]}
    reference = rows["autograd exact"]["log_prob"]
    for name, row in rows.items():
        row["max_abs_difference"] = (row.pop("log_prob") - reference).abs().max().item()
        row["ratio"] = rows["autograd exact"]["seconds"] / row["seconds"]
        print(f"\n{name}: {row['seconds']:.2f} s, {row['evaluations']} evaluations, {row['ratio']:.2f}x, "
              f"max |Δ log q| {row['max_abs_difference']:.1e}")
    benchmark.extra_info.update({"device": DEVICE, "threads": THREADS, "n": n, "dim": dim, "rows": rows})
    cnf = CNF(velocity, dim, context_dim=context_dim)
    benchmark.pedantic(without_grad(lambda: cnf.log_prob(x, context)), rounds=1, iterations=1, setup=synchronizer(device))
