"""Device operations per call of a 5-layer coupling flow (log_prob without autograd, log_prob + backward) for
fastflow's backends and zuko: the host-side cost that dominates at GPU batch sizes (each op is a kernel
launch and a trip through PyTorch's dispatcher; on an H200 zuko spent ~25 µs per op). Counted on CPU with a
TorchDispatchMode, the Triton kernels stubbed out (Triton's CPU interpreter would add its own tensor copies),
so the counts are what a CUDA run launches besides the Triton kernels themselves; views and allocations are
left out.

Usage: TRITON_INTERPRET=1 python bench/count_ops.py [DIM]   (zuko from the `bench` extra)
"""

from __future__ import annotations

import collections
import os
import sys
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


def table(dim: int = 8, rows: int = 256) -> list[tuple[str, str, int, int]]:
    """(transform, implementation, log_prob ops, log_prob+backward ops) for fastflow's reference and Triton
    backends (`-fp32`: the Triton backend as on CUDA with fp32 products, its conditioners in torch) and zuko (the
    coupling benchmark's flows: 5 layers, width 128, SiLU conditioners)."""
    from fastflow import benchmarks
    from fastflow.flows import FlowConfig
    from fastflow.nn import CouplingFlow

    from fastflow.ops import coupling

    x = torch.randn(rows, dim)
    result = []
    for transform in ("spline", "affine"):
        config = FlowConfig(transform=transform, num_layers=5, hidden=128, num_bins=8)
        flows = {f"fastflow-{backend}": CouplingFlow(dim, config=config, backend=backend) for backend in ("reference", "triton")}
        flows["fastflow-triton-fp32"] = flows["fastflow-triton"]  # as on CUDA with fp32 products: conditioner in torch
        try:
            flows["zuko"] = benchmarks._ZukoAdapter(benchmarks._zuko_flow(transform, dim, torch.nn.SiLU))
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

            with mock.patch.object(coupling, "fuses_conditioner", lambda precision, device: not name.endswith("fp32")):
                result.append((transform, name, launches(log_prob), launches(training)))
    return result


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the Triton backend on CPU tensors; its kernels are stubbed)")
    stub_triton_kernels()
    print(f"{'transform':10s} {'implementation':20s} {'log_prob':>9s} {'log_prob+backward':>18s}")
    for transform, name, forward, training in table(int(sys.argv[1]) if len(sys.argv) > 1 else 8):
        print(f"{transform:10s} {name:20s} {forward:9d} {training:18d}")


if __name__ == "__main__":
    main()
