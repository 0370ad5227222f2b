"""Where the time of a benchmark case goes: wall time per call against the device's kernel time, the number of
kernel launches, and the kernels that take longest (torch.profiler). A case whose wall time far exceeds its
kernel time is host-bound (dispatch, launches): fewer ops pay there, faster kernels do not. Profiles the
`fastflow bench` cases named in PROFILED (or on the command line as "FAMILY::CASE::IMPLEMENTATION") and writes JSON.

Usage (on a GPU machine; `FASTFLOW_GPU_STEPS=profile bash bench/run_gpu.sh OUT` runs it):
    python bench/profile_gpu.py OUT.json ["FAMILY::CASE::IMPLEMENTATION" ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

PROFILED = [  # (family, case, implementation): the cases short of their targets on an H100 (2026-11-26); an
    # implementation ending in "+fused-backward" runs with FASTFLOW_FUSED_BACKWARD=1 (training through the fused
    # backward)
    ("coupling", "affine d=8 n=65536 log_prob+backward", "fastflow-triton"),
    ("coupling", "affine d=8 n=65536 log_prob+backward", "fastflow-triton-tf32"),
    ("coupling", "affine d=8 n=65536 log_prob+backward", "fastflow-triton-tf32+fused-backward"),
    ("coupling", "affine d=8 n=65536 log_prob+backward", "zuko-realnvp"),
    ("coupling", "spline d=8 n=65536 log_prob+backward", "fastflow-triton-tf32"),  # the layer steps on CUDA
    ("coupling", "affine d=2 n=65536 sample", "fastflow-triton-tf32"),
    ("coupling", "affine d=32 n=65536 sample", "fastflow-triton-tf32"),
    ("coupling", "affine d=2 n=65536 sample", "fastflow-triton"),  # fp32 (torch's default): 0.8x zuko's
    ("coupling", "affine d=8 n=65536 log_prob", "fastflow-triton"),
    ("coupling", "spline d=8 n=65536 log_prob", "fastflow-triton"),
    ("ode", "mlp 3x256 d=2 n=1000000 rk4-100", "fastflow-triton-tf32"),
    ("ode", "mlp 3x256 d=2 n=1000000 rk4-100", "fastflow-triton-bf16"),  # not yet timed
]


FUSED_BACKWARD = "+fused-backward"


def profile_call(fn, device: torch.device, repeats: int = 3, top: int = 8) -> dict:
    """Profile `repeats` calls of `fn` after a warm-up: wall ms per call, device (kernel) ms per call, kernel
    launches per call, and the `top` kernels by device time (name, ms per call, launches per call)."""
    from fastflow.benchmarks import synchronizer, time_call

    synchronize = synchronizer(device)
    fn()
    synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type != DeviceType.CPU]
    device_us = sorted(((e.key, e.self_device_time_total, e.count) for e in kernels), key=lambda row: -row[1])
    return {"wall_ms": 1e3 * time_call(fn, device=device, repeats=repeats, warmup=0),
            "device_ms": sum(us for _, us, _ in device_us) / repeats / 1e3,
            "launches": sum(count for _, _, count in device_us) / repeats,
            "top": [(name[:120], us / repeats / 1e3, count / repeats) for name, us, count in device_us[:top]]}


def profile_cases(device: torch.device, selected: list[tuple[str, str, str]], quick: bool = False) -> list[dict]:
    """Profile each (family, case, implementation) of `selected` among `fastflow.benchmarks.cases`; a name not
    found is reported as missing."""
    from fastflow import benchmarks

    rows = []
    for family in dict.fromkeys(family for family, _, _ in selected):
        cases = {case.name: case for case in benchmarks.cases(device, quick=quick, families=[family])}
        for _, name, implementation in (row for row in selected if row[0] == family):
            base, fused_backward = implementation.removesuffix(FUSED_BACKWARD), implementation.endswith(FUSED_BACKWARD)
            fn = cases[name].implementations.get(base) if name in cases else None
            if fn is None:
                rows.append({"case": name, "implementation": implementation, "missing": True})
                continue
            with mock.patch.dict(os.environ, {"FASTFLOW_FUSED_BACKWARD": "1"} if fused_backward else {}):
                rows.append({"case": name, "implementation": implementation, **profile_call(fn, device)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("profile_gpu.py needs a CUDA device")
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "profile_gpu.json")
    selected = [tuple(arg.split("::")) for arg in sys.argv[2:]] or PROFILED
    if any(len(row) != 3 for row in selected):
        raise SystemExit('name cases as "FAMILY::CASE::IMPLEMENTATION", e.g. "ode::mlp 3x256 d=2 n=1000000 rk4-100::fastflow-triton-tf32"')
    rows = profile_cases(torch.device("cuda"), selected)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": rows},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
