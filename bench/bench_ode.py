"""CNF sampling ODE: fastflow's batched solvers against torchdiffeq `odeint` on the same MLP velocity field,
100 steps for fixed-step methods, Dopri5 and Bogacki–Shampine 3(2) at rtol = atol = 1e-5. Reports seconds, velocity evaluations,
max error against a tight Dopri5 (1e-9) reference on the first 1,000 samples, the ratio to torchdiffeq rk4 (the
fastest of its fp32 run, its run under a bfloat16 autocast and, on CUDA, its TF32 run: issue 5's baseline) and, where
torchdiffeq ran the row's method at its precision (rk4, dopri5, bosh3), the ratio to that run.
On CPU, also Euler and RK4 with the hidden layers' products in bfloat16 (`VelocityMLP.sampling_field(bf16=True)`, as
`OdeConfig(mixed_precision="bf16")` samples). On CUDA with Triton, also the fused integrator (`fastflow.fm.fused.mlp_odeint`: all steps in one launch),
Euler and RK4, with fp32 ("ieee"), TF32 and bfloat16 hidden products (`bf16=True`), and torchdiffeq rk4 with TF32
cuBLAS products as well.

Run: `python -m pytest bench/bench_ode.py --benchmark-only -s`; samples default to 10^4 on CPU and 10^6 on
CUDA (FASTFLOW_BENCH_ODE_SAMPLES overrides); torchdiffeq comes with the `bench` extra.
"""

import importlib.util
import os
import time

import pytest
import torch

from fastflow import set_num_threads
from fastflow.backends import backends
from fastflow.benchmarks import synchronizer, with_bf16_autocast, with_tf32
from fastflow.fm import VelocityMLP, odeint
from fastflow.fm.fused import mlp_odeint

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SAMPLES = int(os.environ.get("FASTFLOW_BENCH_ODE_SAMPLES", "1000000" if DEVICE == "cuda" else "10000"))
THREADS = int(os.environ.get("FASTFLOW_BENCH_THREADS", "1"))
STEPS = 100
GRID = torch.linspace(0.0, 1.0, STEPS + 1)


def _timed(fn):
    synchronize = synchronizer(torch.device(DEVICE))
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - start, result


def _cases(net, x_0):
    cases = {}
    for method in ("euler", "heun", "rk4"):
        cases[f"fastflow {method}-{STEPS}"] = lambda method=method: (lambda s: (s.x, s.evaluations))(odeint(net, x_0, GRID, method=method))
    for method in ("dopri5", "bosh3"):
        cases[f"fastflow {method} 1e-5"] = lambda method=method: (lambda s: (s.x, s.evaluations))(
            odeint(net, x_0, [0.0, 1.0], method=method))
    if DEVICE == "cpu":  # the hidden layers' products in bfloat16 (OdeConfig(mixed_precision="bf16") in a CNF)
        field = net.sampling_field(bf16=True)
        for method in ("euler", "rk4"):
            cases[f"fastflow {method}-{STEPS} bf16"] = lambda method=method: (lambda s: (s.x, s.evaluations))(
                odeint(field, x_0, GRID, method=method))
    if DEVICE == "cuda" and "cuda" in backends()["triton"].devices:
        for method in ("euler", "rk4"):
            for precision in ("ieee", "tf32", "bf16"):
                cases[f"fused {method}-{STEPS} {precision}"] = lambda method=method, precision=precision: (lambda s: (s.x, s.evaluations))(
                    mlp_odeint(net, x_0, GRID, method, backend="triton", precision=None if precision == "bf16" else precision,
                               bf16=precision == "bf16"))
    if importlib.util.find_spec("torchdiffeq") is not None:
        from torchdiffeq import odeint as tdq_odeint

        def counted(method, **options):
            calls = [0]

            def f(t, x):
                calls[0] += 1
                return net(t, x)

            x = tdq_odeint(f, x_0, torch.tensor([0.0, 1.0], device=x_0.device), method=method, **options)[-1]
            return x, calls[0]

        cases[f"torchdiffeq rk4-{STEPS}"] = lambda: counted("rk4", options={"step_size": 1.0 / STEPS})
        if DEVICE == "cuda":  # with TF32 cuBLAS products too: the like-for-like baseline of the fused TF32 rows
            cases[f"torchdiffeq rk4-{STEPS} tf32"] = with_tf32(cases[f"torchdiffeq rk4-{STEPS}"])
        # and under torch's bfloat16 autocast: the like-for-like baseline of the bfloat16 rows
        cases[f"torchdiffeq rk4-{STEPS} bf16"] = with_bf16_autocast(cases[f"torchdiffeq rk4-{STEPS}"], torch.device(DEVICE))
        for method in ("dopri5", "bosh3"):
            cases[f"torchdiffeq {method} 1e-5"] = lambda method=method: counted(method, rtol=1e-5, atol=1e-5)
    return cases


@pytest.mark.parametrize("dim", [2, 10])
@pytest.mark.parametrize("width", [64, 256])
def test_ode_sampling(benchmark, width, dim):
    set_num_threads(THREADS)  # torch's and the native kernels' OpenMP threads alike
    torch.manual_seed(0)
    net = VelocityMLP(dim, hidden=(width,) * 3).to(DEVICE).requires_grad_(False)
    x_0 = torch.randn(SAMPLES, dim, device=DEVICE)
    net_64 = VelocityMLP(dim, hidden=(width,) * 3).to(DEVICE).requires_grad_(False)
    net_64.load_state_dict(net.state_dict())
    reference = odeint(net_64.double(), x_0[:1000].double(), [0.0, 1.0], method="dopri5", rtol=1e-9, atol=1e-9).x
    rows = {}
    # without autograd, as CNF.sample runs (fastflow's and torchdiffeq's calls alike)
    cases = {name: torch.no_grad()(fn) for name, fn in _cases(net, x_0).items()}
    baseline_name = f"fastflow rk4-{STEPS}"
    seconds, (x, evaluations) = benchmark.pedantic(lambda: _timed(cases[baseline_name]), rounds=1, iterations=1)
    rows[baseline_name] = (seconds, evaluations, (x[:1000].double() - reference).abs().max().item())
    for name, fn in cases.items():
        if name != baseline_name:
            if name.startswith("fused"):
                fn()  # the Triton compile, outside the timing (the other rows have none)
            seconds, (x, evaluations) = _timed(fn)
            rows[name] = (seconds, evaluations, (x[:1000].double() - reference).abs().max().item())
    # the fastest of torchdiffeq's fp32, bfloat16-autocast and TF32 (CUDA) runs, else fastflow's eager RK4
    anchor = min((rows[name][0] for name in (f"torchdiffeq rk4-{STEPS}", f"torchdiffeq rk4-{STEPS} tf32",
                                             f"torchdiffeq rk4-{STEPS} bf16") if name in rows),
                 default=rows[baseline_name][0])
    lines = [f"\nODE sampling, {SAMPLES} samples, dim {dim}, MLP 3x{width}, {DEVICE}, {THREADS} thread(s)"]
    info = {}
    for name, (s, e, err) in rows.items():
        same = rows.get(_same_method(name))  # like for like: torchdiffeq's run of this method and precision
        lines.append(f"  {name:26s} {s:8.3f} s  {e:5d} evals  max err {err:.1e}  speedup vs torchdiffeq rk4 "
                     f"{anchor / s:5.2f}x" + ("" if same is None else f", vs its {name.split(' ', 1)[1]} {same[0] / s:5.2f}x"))
        info[name] = {"seconds": s, "evaluations": e, "max_error": err, "vs_torchdiffeq_rk4": anchor / s,
                      "vs_torchdiffeq_same_method": None if same is None else same[0] / s}
    print("\n".join(lines))
    benchmark.extra_info.update(info)


def _same_method(name: str) -> str | None:
    """The torchdiffeq row of row `name`'s method, tolerance and precision ("fused rk4-100 ieee": the fp32 run)."""
    implementation, *spec = name.split(" ")
    if implementation not in ("fastflow", "fused"):
        return None
    return " ".join(["torchdiffeq", *(part for part in spec if part != "ieee")])
