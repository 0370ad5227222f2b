"""Device operations per call of a 5-layer coupling flow (log_prob without autograd, log_prob + backward) for
fastflow's backends and zuko: the host-side cost that dominates at GPU batch sizes (each op is a kernel
launch and a trip through PyTorch's dispatcher; on an H200 zuko spent ~25 µs per op). Counted on CPU with a
TorchDispatchMode, the Triton kernels stubbed out (Triton's CPU interpreter would add its own tensor copies),
so the counts are what a CUDA run launches besides the Triton kernels themselves; views and allocations are
left out.

With --time, also each call's host time with the kernels stubbed and 2 rows (`host_microseconds`).

Usage: TRITON_INTERPRET=1 python bench/count_ops.py [DIM] [--time]   (zuko from the `bench` extra)
"""

from __future__ import annotations

import collections
import os
import sys
import time
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NOT_LAUNCHES = {"empty", "empty_like", "new_empty", "view", "_unsafe_view", "reshape", "slice", "select", "t",
                "transpose", "permute", "expand", "as_strided", "detach", "alias", "unsqueeze", "squeeze", "unbind",
                "split", "split_with_sizes", "set_", "lift_fresh"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def launches(fn) -> int:
    """Operations of fn() that launch work (after one warm-up call)."""
    fn()
    with _Count() as count:
        fn()
    return sum(n for name, n in count.ops.items() if name not in NOT_LAUNCHES)


class _Stub:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_triton_kernels(assign=setattr) -> None:
    """Replace every Triton kernel of fastflow.kernels with a launch that does nothing (outputs stay garbage),
    through `assign(module, name, value)` (e.g. pytest's monkeypatch.setattr)."""
    from fastflow.kernels import affine, coupling, coupling_backward, ode, spline

    for module in (affine, coupling, coupling_backward, ode, spline):
        for name in [name for name in vars(module) if name.endswith("_kernel")]:
            assign(module, name, _Stub())


def _cases(dim: int, rows: int):
    """(transform, implementation, log_prob(), training()) for fastflow's reference and Triton backends, the latter as
    on CUDA: TF32 products with its conditioners fused, training through the layer steps (CUDA's default) or the
    fused backward (`+fused-backward`, FASTFLOW_FUSED_BACKWARD=1; under the interpreter it is the default, which
    counted it for the plain row), and `-fp32` (conditioners in torch), and zuko (the coupling benchmark's
    baselines: 5 layers, width 128, SiLU conditioners; its coupling spline flow for splines); call them before
    taking the next case (the dispatch of the implementation holds until then)."""
    from fastflow import benchmarks
    from fastflow.flows import FlowConfig
    from fastflow.nn import CouplingFlow
    from fastflow.ops import coupling, coupling_flow

    x = torch.randn(rows, dim)
    for transform in ("spline", "affine"):
        config = FlowConfig(transform=transform, num_layers=5, hidden=128, num_bins=8)
        flows = {f"fastflow-{backend}": CouplingFlow(dim, config=config, backend=backend) for backend in ("reference", "triton")}
        flows["fastflow-triton+fused-backward"] = flows["fastflow-triton-fp32"] = flows["fastflow-triton"]
        try:
            kind = "coupling-spline" if transform == "spline" else transform  # zuko's flow of the same architecture
            flows["zuko"] = benchmarks._ZukoAdapter(benchmarks._zuko_flow(kind, dim, torch.nn.SiLU))
        except ImportError:  # zuko (the `bench` extra) not installed: fastflow's rows only
            pass
        for name, flow in flows.items():
            parameters = list((flow.flow if name == "zuko" else flow).parameters())

            def log_prob(flow=flow):
                with torch.no_grad():
                    flow.log_prob(x)

            def training(flow=flow, parameters=parameters):
                for p in parameters:
                    p.grad = None
                flow.log_prob(x).mean().backward()

            with mock.patch.object(coupling, "fuses_conditioner", lambda precision, device: not name.endswith("fp32")), \
                    mock.patch.object(coupling_flow, "trains_fused", lambda device: name.endswith("fused-backward")):
                yield transform, name, log_prob, training  # (the consumer calls them inside the patches)


def table(dim: int = 8, rows: int = 256) -> list[tuple[str, str, int, int]]:
    """(transform, implementation, log_prob ops, log_prob+backward ops) of each `_cases` implementation."""
    return [(transform, name, launches(log_prob), launches(training))
            for transform, name, log_prob, training in _cases(dim, rows)]


def host_microseconds(fn, calls: int = 100, rounds: int = 5) -> float:
    """fn()'s wall time per call in µs, the best of `rounds` rounds (after a warm-up round): with the kernels stubbed
    and a few rows, the host-side cost of a call (Python, dispatch, autograd), which bounds GPU times at small sizes
    (this machine's CPU, not the GPU host's: compare implementations within one run)."""
    best = float("inf")
    for round_ in range(rounds + 1):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if round_:
            best = min(best, (time.perf_counter() - start) / calls)
    return 1e6 * best


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the Triton backend on CPU tensors; its kernels are stubbed)")
    stub_triton_kernels()
    timed = "--time" in sys.argv
    arguments = [a for a in sys.argv[1:] if a != "--time"]
    print(f"{'transform':10s} {'implementation':30s} {'log_prob':>9s} {'log_prob+backward':>18s}"
          + (f" {'host us':>9s} {'host us (+backward)':>20s}" if timed else ""))
    for transform, name, log_prob, training in _cases(int(arguments[0]) if arguments else 8, rows=2 if timed else 256):
        line = f"{transform:10s} {name:30s} {launches(log_prob):9d} {launches(training):18d}"
        if timed:
            line += f" {host_microseconds(log_prob):9.0f} {host_microseconds(training):20.0f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
