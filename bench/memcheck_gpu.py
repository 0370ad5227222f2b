"""compute-sanitizer's memcheck over the Triton kernels at their default launch settings, on small sizes, before the
timed steps: a miscompiled kernel that reads or writes out of bounds kills the process's CUDA context (an H100 run
lost its sweep and bench that way, bench/results/gpu_fused_backward_2026-11-26_*), and one that does not fault
may still read garbage. Each case runs in its own sanitized process (the first fault ends a process) and prints,
per call, its largest error against the fp32 reference; the parent records the sanitizer's verdict, the first
invalid access it reports and those errors.

Cases: 5-layer coupling flows (width 128, 8 bins), affine and spline at 2, 8 and 32 dims: log_prob and sample
without autograd (the fused run, TF32; and the layer steps, fp32), training through the layer steps and through the
fused backward (FASTFLOW_FUSED_BACKWARD=1; splines also at 8 warps); and the fused ODE integrator (3x64 and 3x256
fields, RK4; TF32, 3xTF32 and bfloat16 hidden products, the last at its defaults and streamed at 128 rows as the
sweep runs it).

Usage (on a GPU machine; `FASTFLOW_GPU_STEPS=memcheck bash bench/run_gpu.sh OUT` runs it):
    python bench/memcheck_gpu.py OUT.json [CASE ...]     (CASE: e.g. "coupling spline 8", "ode 256")
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch

CASES = [*(f"coupling {transform} {dim}" for transform in ("affine", "spline") for dim in (2, 8, 32)), "ode 64", "ode 256"]


def _report(call: str, error: float) -> None:
    print("RESULT " + json.dumps({"call": call, "max_error": error}), flush=True)


def _coupling(transform: str, dim: int, rows: int = 256, hidden: int = 128, device: str = "cuda") -> None:
    """The coupling flow's calls on `rows` rows, each against the fp32 reference flow."""
    from fastflow.flows import FlowConfig
    from fastflow.nn import CouplingFlow

    torch.manual_seed(0)
    config = FlowConfig(transform=transform, num_layers=5, hidden=hidden, num_bins=8)
    reference = CouplingFlow(dim, config=config, backend="reference").to(device)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flow = CouplingFlow(dim, config=config, backend="triton").to(device)
    flow.load_state_dict(reference.state_dict())
    x = torch.randn(rows, dim, device=device)

    def gradient(model):
        model.zero_grad()
        model.log_prob(x).mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    with torch.no_grad():
        log_prob_ref = reference.log_prob(x)
        torch.manual_seed(1)
        draws_ref = reference.sample(rows)
    gradient_ref = gradient(reference)
    for tf32 in (True, False):  # TF32: the fused run; fp32: the layer steps
        torch.backends.cuda.matmul.allow_tf32 = tf32
        suffix = "tf32" if tf32 else "fp32"
        with torch.no_grad():
            _report(f"log_prob {suffix}", (flow.log_prob(x) - log_prob_ref).abs().max().item())
            torch.manual_seed(1)
            _report(f"sample {suffix}", (flow.sample(rows) - draws_ref).abs().max().item())
    torch.backends.cuda.matmul.allow_tf32 = True
    for fused in ("0", "1"):
        os.environ["FASTFLOW_FUSED_BACKWARD"] = fused
        error = ((gradient(flow) - gradient_ref).norm() / gradient_ref.norm()).item()
        _report(f"training {'fused' if fused == '1' else 'steps'} tf32 (relative)", error)
    if transform == "spline":  # last (a fault ends the process): 8 warps, where the earlier kernel read out of bounds
        from fastflow.kernels import coupling_backward

        with mock.patch.object(coupling_backward, "default_warps", lambda spline: 8):
            error = ((gradient(flow) - gradient_ref).norm() / gradient_ref.norm()).item()
        _report("training fused tf32 8 warps (relative)", error)


def _ode(width: int, samples: int = 512, device: str = "cuda") -> None:
    """The fused RK4 integrator of a 3-hidden-layer field of `width` (2-D) against the reference integrator (its
    bfloat16 mode against `bf16_hidden_field`'s)."""
    from fastflow.fm import VelocityMLP
    from fastflow.fm.fused import mlp_odeint

    torch.manual_seed(0)
    net = VelocityMLP(2, hidden=(width,) * 3).to(device).requires_grad_(False)
    x, grid = torch.randn(samples, 2, device=device), torch.linspace(0.0, 1.0, 21)
    with torch.no_grad():
        reference = mlp_odeint(net, x, grid, "rk4", backend="reference").x
        for precision in ("tf32", "tf32x3"):
            fused = mlp_odeint(net, x, grid, "rk4", backend="triton", precision=precision).x
            _report(f"rk4 {precision}", (fused - reference).abs().max().item())
        reference = mlp_odeint(net, x, grid, "rk4", backend="reference", bf16=True).x
        streamed = dict(block_m=128, block_k=min(32, width), block_n=min(64, width), k_stages=2, num_warps=8)
        for name, launch in (("defaults", {}), ("streamed", streamed)):
            fused = mlp_odeint(net, x, grid, "rk4", backend="triton", bf16=True, launch=launch).x
            _report(f"rk4 bf16 {name}", (fused - reference).abs().max().item())


def run_case(case: str) -> None:
    """One case, in this process (the sanitized child)."""
    kind, *arguments = case.split()
    if kind == "coupling":
        _coupling(arguments[0], int(arguments[1]))
    elif kind == "ode":
        _ode(int(arguments[0]))
    else:
        raise ValueError(f"unknown case {case!r}: expected one of {CASES}")


def sanitize(case: str, timeout: float = 240.0, sanitizer: str | None = None) -> dict:
    """`case` in a child process under compute-sanitizer memcheck (`sanitizer`: its path; default
    $COMPUTE_SANITIZER, else found on PATH or in /usr/local/cuda): its verdict, the first invalid accesses
    reported, the calls' errors (those before a fault), the child's exit status and `clean`: no sanitizer error, exit
    status 0 and every call reported (compute-sanitizer's "0 errors" also ends a child that raised, which a crashed
    case read as a pass; its output's tail is kept then)."""
    sanitizer = (sanitizer or os.environ.get("COMPUTE_SANITIZER") or shutil.which("compute-sanitizer")
                 or "/usr/local/cuda/bin/compute-sanitizer")
    command = [sanitizer, "--tool", "memcheck", "--show-backtrace", "no", "--print-limit", "3",
               sys.executable, __file__, "--case", case]
    returncode = None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        output, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() + (expired.stderr or b"").decode() + "\nTIMEOUT"
    summary = re.search(r"ERROR SUMMARY: (\d+) error", output)
    invalid = re.findall(r"=+\s+(Invalid .*|.*out of bounds.*|at .*kernel.*)", output)
    calls = [json.loads(line[len("RESULT "):]) for line in output.splitlines() if line.startswith("RESULT ")]
    errors = int(summary.group(1)) if summary else None
    clean = errors == 0 and returncode == 0 and bool(calls)
    return {"case": case, "clean": clean, "sanitizer_errors": errors, "returncode": returncode,
            "first_invalid": invalid[:3], "timed_out": "TIMEOUT" in output, "calls": calls,
            **({} if clean else {"output_tail": output[-2000:]})}


def main() -> None:
    if sys.argv[1:2] == ["--case"]:
        run_case(sys.argv[2])
        return
    if not torch.cuda.is_available():
        raise SystemExit("memcheck_gpu.py needs a CUDA device")
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "memcheck_gpu.json")
    rows = []
    for case in sys.argv[2:] or CASES:
        rows.append(sanitize(case))
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                   "results": rows}, indent=1))
    print(f"wrote {out}")
    if not all(row["clean"] for row in rows):
        raise SystemExit(f"not clean: {[row['case'] for row in rows if not row['clean']]}")


if __name__ == "__main__":
    main()
