"""Launch-setting sweep of the Triton kernels on CUDA, to choose their defaults from timings: the elementwise
spline kernels (elements and warps per program, against the reference's autograd), the fused ODE integrator
(rows per program, weight chunk, output chunk, pipelining, persistent programs, warps), the fused runs of
spline/affine coupling layers (rows per program, first-layer units per chunk, warps, spline columns per pass), the
backward of fused runs (rows, warps, programs), a fused layer on its own and the affine training step's
kernels (rows and warps per program), TF32 products. Prints one line per setting and writes JSON.

Usage (on a GPU machine; `FASTFLOW_GPU_STEPS=sweep bash bench/run_gpu.sh OUT` runs it):
    python bench/sweep_gpu.py OUT.json [SWEEP ...]   (SWEEP: a `SWEEPS` name; default all, each in its own process)

Static facts from sm_90 compiles (bench/sm90.py: cuobjdump --dump-resource-usage of Triton 3.9's cubins, RK4, 3 hidden layers):
width 64 compiles without spills at (block_m, block_k, warps) = (64, 16, 4), (64, 64, 4), (64, 16, 8),
(128, 64, 8), and in one chunk (block_k 64, the default); at width 256 every whole-layer setting spills (0.6-3.4 KB
of stack per thread), while the streamed ones (block_n 64 or 128, pipelined, 4 or 8 warps) do not (212-226 registers). Timed on an H100 (bench/results/gpu_sweep_2026-11-26_NVIDIA-H100-80GB-HBM3.json, 131,072
samples, RK4-100): the ODE defaults were the fastest setting at both widths (7.2 ms at width 64, 220 ms at 256);
the exact activations took 2.4x / 1.4x longer, and weights outside shared memory 1.2x at width 64. Spill-free
is not fastest for the coupling runs: 4 warps (spilling) beat 8 (none), see `kernels.coupling.FLOW_LAUNCH`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch

ODE_SETTINGS = {  # width: launch settings of `mlp_odeint` (kernels.ode.mlp_odeint_triton), the defaults first; "bf16":
    # the hidden products on bfloat16 operands (`mlp_odeint(bf16=True)`, not a launch setting), not yet timed. Ordered by
    # what a short GPU session most needs to know (each width-256 setting compiles for tens of seconds, and a sweep cut
    # by its time limit keeps the rows measured): the float32 default, bf16 at its defaults, then the candidates for
    # the 3x256 target (streamed at 128 rows, quartering the weight bytes per row with bf16), then the rest.
    64: [{}, dict(bf16=True), dict(block_m=128, block_k=64, num_warps=8), dict(bf16=True, block_m=128, block_k=64, num_warps=8)],
    256: [{}, dict(bf16=True),
          dict(bf16=True, block_m=128, block_k=32, block_n=64, k_stages=2, num_warps=8),  # sm_90: 254 registers, no spills
          dict(bf16=True, block_m=64, block_k=32, block_n=32, k_stages=2, num_warps=8),  # 127 registers: 2 programs per SM
          # float32 (TF32) at 128 rows: half the weight reads per row (at 64 rows, RK4-100 over 10^6 samples reads ~3.3 TB
          # of weights from L2: ~0.6 s at its bandwidth, near the 5x target's 0.72 s; the TF32 products alone take ~0.2 s)
          dict(block_m=128, block_k=32, block_n=64, k_stages=2, num_warps=8, programs=264),  # 2 per SM (132 SMs)
          dict(block_m=128, block_k=16, block_n=128, k_stages=2, num_warps=8),  # 80 B of spills
          *(dict(bf16=True, block_m=m, block_k=k, block_n=n, k_stages=s, num_warps=8, **extra) for m, k, n, s, extra in (
              (64, 32, 64, 2, {}), (128, 32, 64, 1, {}), (128, 64, 64, 2, {}), (128, 32, 64, 2, dict(programs=264)),
              (128, 32, 32, 2, {}))),
          dict(block_k=16, k_stages=2),  # the float32 default with its weight-chunk loop pipelined
          *(dict(block_m=m, block_k=k, block_n=64, k_stages=s, num_warps=w) for m, k, s, w in (  # streamed layers
              (64, 32, 1, 8), (64, 32, 2, 8), (128, 32, 2, 8), (128, 64, 2, 8), (128, 32, 3, 8))),
          dict(block_m=64, block_k=32, block_n=32, k_stages=2, num_warps=8),  # no spills with a context either
          dict(block_m=64, block_k=16, block_n=128, k_stages=2, num_warps=8),  # sm_90: 218 registers, no spills
          dict(block_m=64, block_k=16, block_n=64, k_stages=2, num_warps=4)],  # no spills, 2 programs per SM
}
COUPLING_SETTINGS = [{}, *(dict(block_m=m, block_hk=k, num_warps=w) for m, k, w in (  # fused 5-layer runs, default first
    (32, None, 4), (64, 32, 8), (128, 32, 8), (128, 32, 4), (64, 64, 4)))]  # (32, None, 4): the per-layer kernels' default
SPLINE_CHUNK_COLUMNS = (32, None)  # spline (coordinate, bin) columns per pass besides the default 16 (None: whole layer)
LAYER_SETTINGS = [{}, *(dict(block_m=m, num_warps=w) for m, w in ((32, 8), (64, 4), (64, 8), (128, 8)))]  # default first
AFFINE_STEP_SETTINGS = [{}, *(dict(block_m=m, num_warps=w) for m, w in ((16, 4), (32, 4), (64, 4), (64, 8), (128, 8)))]
SPLINE_SETTINGS = [(64, 4), (32, 4), (64, 2), (128, 4), (128, 8)]  # (block, num_warps), 8 bins: default first
BACKWARD_SETTINGS = {  # per transform, the default first (64 rows, 16 first-layer units per chunk; 8 warps affine, 4
    # spline: the earlier kernel faulted on splines at 64 x 8 on an H100 (bench/memcheck_gpu.py checks 64 x 8 now), and
    # an illegal address ends the sweep's process)
    "affine": [{}, *(dict(block_m=m, block_hk=k, num_warps=w) for m, k, w in (
        (64, 32, 8), (64, 64, 8), (128, 16, 8), (64, 16, 4), (32, 16, 4)))],
    "spline": [{}, *(dict(block_m=m, block_hk=k, num_warps=w) for m, k, w in ((64, 32, 4), (128, 16, 8)))],
}


def _milliseconds(fn, device: torch.device, repeats: int = 3) -> float:
    """Median time of fn() in ms after one warm-up call (the compile), synchronizing CUDA."""
    from fastflow.benchmarks import time_call

    return 1e3 * time_call(fn, device=device, repeats=repeats)


def _record(rows: list[dict], **row) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def sweep_ode(rows: list[dict], device: torch.device, samples: int = 131_072, steps: int = 100,
              settings: dict[int, list[dict]] = ODE_SETTINGS) -> None:
    from fastflow.fm import VelocityMLP
    from fastflow.fm.fused import mlp_odeint

    grid = torch.linspace(0.0, 1.0, steps + 1)
    for width, launches in settings.items():
        torch.manual_seed(0)
        net = VelocityMLP(2, hidden=(width,) * 3).to(device).requires_grad_(False)
        x = torch.randn(samples, 2, device=device)
        with torch.no_grad():
            reference = mlp_odeint(net, x, grid, "rk4", backend="reference").x
            for setting in launches:
                launch = {key: value for key, value in setting.items() if key != "bf16"}
                try:
                    run = lambda: mlp_odeint(net, x, grid, "rk4", backend="triton", precision="tf32",  # noqa: E731
                                             bf16=setting.get("bf16", False), launch=launch).x
                    ms = _milliseconds(run, device)
                    error = (run() - reference).abs().max().item()
                    _record(rows, kernel="ode", width=width, samples=samples, steps=steps, **setting, ms=ms, max_error=error)
                except Exception as failure:  # a setting that does not compile (shared memory) is a result too
                    _record(rows, kernel="ode", width=width, **setting, error=f"{type(failure).__name__}: {failure}"[:300])


def _benchmark_flow(transform: str, dim: int, hidden: int, device: torch.device):
    """The benchmark's 5-layer coupling flow (8 bins) on the Triton backend, its weights moved off their initial values,
    and its one run of layers (`CouplingRun`)."""
    from fastflow.flows import FlowConfig
    from fastflow.nn import CouplingFlow

    torch.manual_seed(0)
    flow = CouplingFlow(dim, config=FlowConfig(transform=transform, num_layers=5, hidden=hidden, num_bins=8),
                        backend="triton").to(device)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    (run,) = flow._chain(inverse=False)
    return flow, run


def sweep_coupling(rows: list[dict], device: torch.device, batch: int = 65_536, hidden: int = 128,
                   settings: list[dict] = COUPLING_SETTINGS, flows=(("spline", 8), ("spline", 32), ("affine", 8))) -> None:
    """The fused run of the benchmark's 5-layer coupling flows (width 128, 8 bins; `CouplingRun.fused`), log_prob,
    for each (transform, dim) of `flows`."""
    for transform, dim in flows:
        flow, run = _benchmark_flow(transform, dim, hidden, device)
        x = torch.randn(batch, dim, device=device)
        launches = settings + ([dict(chunk_columns=columns) for columns in SPLINE_CHUNK_COLUMNS] if transform == "spline" else [])
        for launch in launches:
            try:
                with torch.no_grad():
                    ms = _milliseconds(lambda: run.fused(x, None, "tf32", **launch), device)  # noqa: B023
                _record(rows, kernel=f"{transform}_flow", dim=dim, batch=batch, **launch, ms=ms)
            except Exception as failure:
                _record(rows, kernel=f"{transform}_flow", dim=dim, **launch, error=f"{type(failure).__name__}: {failure}"[:300])


def sweep_layers(rows: list[dict], device: torch.device, batch: int = 65_536, hidden: int = 128, dim: int = 8,
                 settings: list[dict] = LAYER_SETTINGS) -> None:
    """One fused coupling layer (`kernels.coupling.*_coupling_triton`, a layer used on its own), TF32 products,
    spline (8 bins) and affine, forward."""
    from fastflow.kernels.coupling import affine_coupling_triton, spline_coupling_triton
    from fastflow.ops.spline import SPLINE_CONSTANTS

    torch.manual_seed(0)
    kept, changed = dim // 2, dim - dim // 2
    x = torch.randn(batch, dim, device=device)
    for transform, outputs in (("spline", 23 * changed), ("affine", 2 * changed)):
        weights = (0.3 * torch.randn(hidden, kept, device=device), torch.zeros(hidden, device=device),
                   0.1 * torch.randn(hidden, hidden, device=device), torch.zeros(hidden, device=device),
                   0.1 * torch.randn(outputs, hidden, device=device), torch.zeros(outputs, device=device))
        for launch in settings:
            if transform == "spline":
                run = lambda: spline_coupling_triton(x[:, :kept], None, x[:, kept:], weights, num_bins=8, bound=3.0,  # noqa: E731,B023
                                                     inverse=False, constants=SPLINE_CONSTANTS, precision="tf32", **launch)  # noqa: B023
            else:
                run = lambda: affine_coupling_triton(x[:, :kept], None, x[:, kept:], weights, scale_bound=3.0,  # noqa: E731,B023
                                                     inverse=False, precision="tf32", **launch)  # noqa: B023
            try:
                with torch.no_grad():
                    _record(rows, kernel=f"{transform}_layer", dim=dim, batch=batch, **launch, ms=_milliseconds(run, device))
            except Exception as failure:
                _record(rows, kernel=f"{transform}_layer", dim=dim, **launch, error=f"{type(failure).__name__}: {failure}"[:300])


def sweep_affine_step(rows: list[dict], device: torch.device, batch: int = 65_536, hidden: int = 128, dim: int = 8,
                      settings: list[dict] = AFFINE_STEP_SETTINGS) -> None:
    """The affine training step's kernels (`kernels.affine.affine_step_*_triton`, TF32) on one layer of the
    benchmark's flows, forward and backward."""
    from fastflow.kernels.affine import affine_step_backward_triton, affine_step_forward_triton

    torch.manual_seed(0)
    kept, changed = dim // 2, dim - dim // 2
    a, x = torch.randn(batch, hidden, device=device), torch.randn(batch, dim, device=device)
    w3, b3 = 0.1 * torch.randn(2 * changed, hidden, device=device), torch.zeros(2 * changed, device=device)
    column_map = torch.arange(dim, device=device, dtype=torch.int32).flip(0)
    grad_y, grad_ladj = torch.randn(batch, dim, device=device), torch.randn(batch, device=device)
    options = dict(kept_0=0, changed_0=kept, scale_bound=3.0, inverse=False, precision="tf32")
    for launch in settings:
        for name, run in (("affine_step_forward", lambda: affine_step_forward_triton(  # noqa: B023
                              a, w3, b3, x[:, :kept], x[:, kept:], None, column_map, **options, **launch)),  # noqa: B023
                          ("affine_step_backward", lambda: affine_step_backward_triton(  # noqa: B023
                              a, w3, b3, x[:, kept:], column_map, grad_y, grad_ladj, n_kept=kept, **options, **launch))):  # noqa: B023
            try:
                _record(rows, kernel=name, dim=dim, batch=batch, **launch, ms=_milliseconds(run, device))
            except Exception as failure:
                _record(rows, kernel=name, dim=dim, **launch, error=f"{type(failure).__name__}: {failure}"[:300])


def sweep_training(rows: list[dict], device: torch.device, batch: int = 65_536, hidden: int = 128,
                   settings: dict[str, list[dict]] = BACKWARD_SETTINGS,
                   flows=(("affine", 8), ("affine", 32), ("affine", 2), ("spline", 2), ("spline", 8), ("spline", 32))) -> None:
    """The backward of the benchmark's fused 5-layer runs (`kernels.coupling_backward`, TF32, 8 bins) per launch
    setting of its transform, and the flow's whole log_prob + backward through the layer steps and fused (default
    settings; `fastflow.ops.coupling_flow.trains_fused`), for each (transform, dim)."""
    import os

    from fastflow.kernels.activations import approximate_activations
    from fastflow.kernels.coupling_backward import coupling_flow_backward_triton
    from fastflow.ops.coupling_flow import pack

    approximate = approximate_activations("tf32", device)
    previous = torch.backends.cuda.matmul.allow_tf32, os.environ.get("FASTFLOW_FUSED_BACKWARD")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for transform, dim in flows:
            flow, run = _benchmark_flow(transform, dim, hidden, device)
            x = torch.randn(batch, dim, device=device)
            for fused in (False, True):
                os.environ["FASTFLOW_FUSED_BACKWARD"] = str(int(fused))
                _record(rows, kernel=f"{transform}_flow_training", dim=dim, batch=batch, fused=fused,
                        ms=_milliseconds(lambda: flow.log_prob(x).mean().backward(), device))  # noqa: B023
            params = pack(run.weights())
            _, _, states = run.launch(x, None, params, "tf32", keep_states=True)
            grad_out, grad_ladj = torch.randn(batch, dim, device=device), torch.randn(batch, device=device)
            steps, column_maps = run._on(device)
            for launch in settings[transform]:
                try:
                    ms = _milliseconds(lambda: coupling_flow_backward_triton(  # noqa: B023
                        x, states, None, grad_out, grad_ladj, params, steps, column_maps,  # noqa: B023
                        run.gradient_positions(device, None), **run._sizes(None),  # noqa: B023
                        **run.options, inverse=False, context_grad=False, precision="tf32", approximate=approximate,  # noqa: B023
                        **launch), device)  # noqa: B023
                    _record(rows, kernel=f"{transform}_flow_backward", dim=dim, batch=batch, **launch, ms=ms)
                except Exception as failure:
                    _record(rows, kernel=f"{transform}_flow_backward", dim=dim, **launch,
                            error=f"{type(failure).__name__}: {failure}"[:300])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous[0]
        if previous[1] is None:
            os.environ.pop("FASTFLOW_FUSED_BACKWARD", None)
        else:
            os.environ["FASTFLOW_FUSED_BACKWARD"] = previous[1]


def sweep_spline(rows: list[dict], device: torch.device, elements: int = 1_048_576,
                 settings: list[tuple[int, int]] = SPLINE_SETTINGS) -> None:
    """The elementwise spline kernels (8 bins) forward and backward, with the PyTorch reference's autograd
    forward + backward on the same elements for scale."""
    from fastflow.kernels.spline import rq_spline_backward_triton, rq_spline_forward_triton
    from fastflow.ops.spline import SPLINE_CONSTANTS, rq_spline_ref

    torch.manual_seed(0)
    x, params = torch.randn(elements, device=device), torch.randn(elements, 23, device=device)
    grads = torch.randn(elements, device=device), torch.randn(elements, device=device)

    def reference():
        inputs = (x.clone().requires_grad_(), params.clone().requires_grad_())
        out, ladj = rq_spline_ref(*inputs, bound=3.0)
        torch.autograd.grad((out * grads[0] + ladj * grads[1]).sum(), inputs)

    _record(rows, kernel="rq_spline_reference_fwd_bwd", elements=elements, ms=_milliseconds(reference, device))
    for block, num_warps in settings:
        options = dict(bound=3.0, inverse=False, constants=SPLINE_CONSTANTS, block=block, num_warps=num_warps)
        for name, run in (("rq_spline_forward", lambda: rq_spline_forward_triton(x, params, **options)),
                          ("rq_spline_backward", lambda: rq_spline_backward_triton(x, params, *grads, **options))):
            try:
                _record(rows, kernel=name, elements=elements, block=block, num_warps=num_warps, ms=_milliseconds(run, device))
            except Exception as failure:
                _record(rows, kernel=name, block=block, num_warps=num_warps, error=f"{type(failure).__name__}: {failure}"[:300])


SETTING_KEYS = ("fused", "bf16", "block", "block_m", "block_k", "block_n", "block_hk", "k_stages", "programs", "num_warps", "chunk_columns",
                "approximate", "resident")


def fastest_settings(rows: list[dict]) -> list[str]:
    """Per kernel and size, the fastest setting swept and its speed-up over the default (the row without settings;
    "default failed" where it has none: another setting was read as the default): one line each."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if "ms" in row:
            groups.setdefault((row["kernel"], row.get("width"), row.get("dim")), []).append(row)
    lines = []
    for (kernel, width, dim), timed in groups.items():
        best = min(timed, key=lambda row: row["ms"])
        setting = {key: best[key] for key in SETTING_KEYS if key in best} or "default"
        size = f" width {width}" if width is not None else f" dim {dim}" if dim is not None else ""
        default = next((row for row in timed if not any(key in row for key in SETTING_KEYS)), None)
        against = f"{default['ms'] / best['ms']:.2f}x the default" if default else "default failed"
        lines.append(f"{kernel}{size}: fastest {setting} {best['ms']:.3f} ms, {against}")
    return lines


SWEEPS = {"training": sweep_training,  # first: the fused backward is barely timed (affine 8-D)
          "ode": sweep_ode,  # the streamed width-256 settings matter most (issue 5's target)
          "coupling": sweep_coupling, "affine_step": sweep_affine_step, "layers": sweep_layers, "spline": sweep_spline}


def sweep_in_children(names: list[str], rows: list[dict]) -> None:
    """Each sweep of `names` in its own process (a kernel that faults ends its process's CUDA context, not the
    other sweeps), its rows appended to `rows` as it prints them; a sweep that dies is recorded with its last
    output."""
    for name in names:
        child = subprocess.Popen([sys.executable, __file__, "--sweep", name], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in child.stdout:
            print(line, end="", flush=True)
            if line.startswith("{"):
                rows.append(json.loads(line))
            tail = (tail + [line.rstrip()])[-5:]
        if child.wait():
            rows.append({"sweep": name, "exit": child.returncode, "error": " | ".join(tail)[-600:]})


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("sweep_gpu.py needs a CUDA device")
    if sys.argv[1:2] == ["--sweep"]:
        SWEEPS[sys.argv[2]]([], torch.device("cuda"))  # (the child: prints its rows)
        return
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "sweep_gpu.json")
    rows: list[dict] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a time limit (timeout) still writes what was measured
    try:
        sweep_in_children(sys.argv[2:] or list(SWEEPS), rows)
    finally:
        import triton

        out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                   "triton": triton.__version__, "results": rows}, indent=1))
        print("\n".join(fastest_settings(rows)))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
