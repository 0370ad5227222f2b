"""The speed-table runner: every case times each implementation and reports ratios to its baseline."""

import importlib.util
import json
from pathlib import Path
from unittest import mock

import pytest
import torch

from fastflow import benchmarks
from fastflow.cli import main


def _bench_script(name: str):
    """bench/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def interpreter():
    """Skips the test unless Triton's interpreter runs the kernels on CPU (CPU machines; GPU ones compile them)."""
    from fastflow.backends import backends

    if "cpu" not in backends()["triton"].devices:
        pytest.skip("needs the Triton interpreter on CPU")


def test_quick_run_reports_ratios_against_the_baseline():
    results = benchmarks.run("cpu", quick=True, repeats=1, families=["coupling"])
    assert {r.case for r in results} == {
        f"{kind} d=2 n=2048 {work}" for kind in ("spline", "affine") for work in ("log_prob", "sample", "log_prob+backward")
    } | {f"{kind} d=2 n=256 log_prob+backward 4 batches" for kind in ("spline", "affine")}
    for r in results:
        assert r.seconds > 0
        if r.implementation == r.baseline:
            assert r.ratio == 1.0
    assert any(r.implementation == "fastflow-reference" for r in results)


def test_the_minibatch_case_takes_a_training_step_on_every_batch():
    """The coupling family's minibatch case: the gradients it leaves are the sum of each batch's mean-loss gradient."""
    import torch

    from fastflow.flows import FlowConfig
    from fastflow.nn import CouplingFlow

    torch.manual_seed(0)
    flow = CouplingFlow(2, config=FlowConfig(num_layers=2, hidden=8), backend="reference")
    batches = torch.randn(12, 2).split(4)
    benchmarks._backward_each(flow, batches)
    params = list(flow.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for batch in batches:
        for total, grad in zip(expected, torch.autograd.grad(flow.log_prob(batch).mean(), params)):
            total += grad
    for p, total in zip(params, expected):
        torch.testing.assert_close(p.grad, total)


@pytest.mark.skipif(importlib.util.find_spec("zuko") is None, reason="zuko (the bench extra) is not installed")
def test_zuko_coupling_spline_baseline_has_fastflows_parameters():
    """zuko's NSF (autoregressive, two passes) does more work than a coupling flow; `zuko-coupling-nsf` is zuko's
    coupling flow with NSF's transform: the same parameters as fastflow's spline flow."""
    import torch

    from fastflow.flows import FlowConfig
    from fastflow.nn import CouplingFlow

    for dim in (2, 8):
        zuko_flow = benchmarks._zuko_flow("coupling-spline", dim, torch.nn.SiLU)
        ours = CouplingFlow(dim, config=FlowConfig(transform="spline", num_layers=5, hidden=128, num_bins=8))
        assert sum(p.numel() for p in zuko_flow.parameters()) == sum(p.numel() for p in ours.parameters())
    coupling_cases = benchmarks.cases("cpu", quick=True, families=["coupling"])
    names = {name for case in coupling_cases for name in case.implementations}
    assert {"zuko-nsf", "zuko-coupling-nsf", "zuko-realnvp"} <= names
    # the ratios' baselines are the same-architecture flows (zuko's NSF, with more parameters, was the spline one)
    assert {case.name.split()[0]: case.baseline for case in coupling_cases} == {"spline": "zuko-coupling-nsf",
                                                                              "affine": "zuko-realnvp"}


def test_ratios_are_against_the_faster_baseline_run(monkeypatch):
    """On CUDA a baseline runs with fp32 and TF32 products: ratios are against whichever was faster (they were
    against the fp32 run, which flattered the TF32 rows, or noise that made zuko's TF32 run the slower one)."""
    seconds = {"zuko": 0.03, "zuko-tf32": 0.01, "fastflow": 0.005}  # (timings stubbed: each call "takes" these)
    case = benchmarks.Case("toy", "toy case", "zuko", {name: lambda s=s: s for name, s in seconds.items()})
    monkeypatch.setitem(benchmarks._FAMILIES, "toy", lambda device, quick: [case])
    monkeypatch.setattr(benchmarks, "time_call", lambda fn, **options: fn())
    results = {r.implementation: r for r in benchmarks.run("cpu", repeats=1, families=["toy"])}
    assert {r.baseline for r in results.values()} == {"zuko-tf32"}
    assert [results[name].ratio for name in seconds] == pytest.approx([1 / 3, 1.0, 2.0])
    # a run under a bfloat16 autocast counts too where the case has one
    case.implementations["zuko-bf16"] = lambda: 0.004
    results = {r.implementation: r for r in benchmarks.run("cpu", repeats=1, families=["toy"])}
    assert {r.baseline for r in results.values()} == {"zuko-bf16"} and results["fastflow"].ratio == pytest.approx(0.8)


def test_bench_command_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["device"] == "cpu" and payload["results"]
    assert payload["quick"] is True and payload["repeats"] == 1 and payload["fastflow"] and payload["date"]
    assert "vs baseline" in capsys.readouterr().out


def test_time_budget_cuts_the_repeats_of_slow_calls(capsys):
    import time

    import torch

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.02)

    assert benchmarks.time_call(slow, device=torch.device("cpu"), repeats=10, budget=0.03) >= 0.02
    assert len(calls) == 1 + 2  # the warm-up, then timed calls until they have taken 0.03 s
    calls.clear()
    benchmarks.time_call(slow, device=torch.device("cpu"), repeats=4)
    assert len(calls) == 1 + 4
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cpu", "--quick", "--budget", "0"])
    assert "positive number" in capsys.readouterr().err


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown benchmark families"):
        benchmarks.cases("cpu", families=["nope"])


def test_a_family_named_twice_runs_once():
    once = benchmarks.cases("cpu", quick=True, families=["divergence"])
    assert [case.name for case in benchmarks.cases("cpu", quick=True, families=["divergence", "divergence"])] == [
        case.name for case in once]


def test_versions_of_modules_from_other_distributions_are_none(monkeypatch):
    """Some torch builds ship the triton module as pytorch-triton: its version lookup failed and ended the run."""
    import importlib.metadata

    def version(name):
        if name == "triton":
            raise importlib.metadata.PackageNotFoundError(name)
        return "1.0"

    monkeypatch.setattr(importlib.metadata, "version", version)
    payload = benchmarks.to_json([], torch.device("cpu"))
    assert payload["triton"] is None and payload["fastflow"] == "1.0"


def test_ode_family_on_cpu_compares_the_reference_without_triton():
    results = benchmarks.run("cpu", quick=True, repeats=1, families=["ode"])
    assert {r.case for r in results} == {f"mlp 3x64 d=2 n=256 {method}-100" for method in ("rk4", "euler")}
    implementations = {r.implementation for r in results}
    assert {"fastflow-reference", "fastflow-bf16"} <= implementations
    if importlib.util.find_spec("torchdiffeq") is not None:  # (the bench extra) and under torch's bfloat16 autocast
        assert {"torchdiffeq", "torchdiffeq-bf16"} <= implementations
    assert not any("triton" in name for name in implementations)  # the interpreter is for tests, not timings
    for r in results:
        assert r.seconds > 0 and r.baseline in implementations


def test_divergence_family_times_every_way_against_the_chunked_autograd_loop():
    results = benchmarks.run("cpu", quick=True, repeats=1, families=["divergence"])
    assert {r.case for r in results} == {"mlp 3x128 d=2 n=256 exact"}
    assert {r.implementation for r in results} == {"autograd-chunked", "autograd", "torch.func", "fastflow"}
    assert all(r.baseline == "autograd-chunked" and r.seconds > 0 for r in results)


def test_the_chunked_baselines_compute_the_trace():
    import torch

    from fastflow.fm import VelocityMLP, exact_divergence

    net = VelocityMLP(3, hidden=(8, 8)).double()
    x, t = torch.randn(10, 3, dtype=torch.float64), torch.rand(10, dtype=torch.float64)
    expected = exact_divergence(net, t, x)[1]
    torch.testing.assert_close(benchmarks.in_chunks(lambda t, x: exact_divergence(net, t, x)[1], (t, x), 3), expected)
    torch.testing.assert_close(benchmarks.in_chunks(lambda t, x: benchmarks.jacobian_trace(net, t, x), (t, x), 4), expected)


@pytest.mark.triton
def test_gpu_sweep_runs_on_small_sizes_under_the_interpreter(interpreter):
    """bench/sweep_gpu.py (run on GPU machines) on tiny sizes on CPU: each setting gives a time or an error."""
    import torch

    sweep = _bench_script("sweep_gpu")
    rows = []
    sweep.sweep_coupling(rows, torch.device("cpu"), batch=40, hidden=16, settings=[{}, dict(block_m=16, block_hk=16, num_warps=4)],
                         flows=[("spline", 2), ("spline", 3), ("affine", 2)])
    sweep.sweep_ode(rows, torch.device("cpu"), samples=20, steps=2,
                    settings={32: [{}, {"resident": False}, dict(block_m=32, block_k=16, num_warps=4),
                                   dict(block_n=16, k_stages=2, programs=1), dict(bf16=True, block_n=16, programs=1)]})
    sweep.sweep_spline(rows, torch.device("cpu"), elements=100, settings=[(64, 4)])
    sweep.sweep_affine_step(rows, torch.device("cpu"), batch=40, hidden=16, dim=5, settings=[{}, dict(block_m=32, num_warps=4)])
    sweep.sweep_layers(rows, torch.device("cpu"), batch=40, hidden=16, dim=5, settings=[{}, dict(block_m=16, num_warps=4)])
    sweep.sweep_training(rows, torch.device("cpu"), batch=40, hidden=16, flows=(("affine", 5), ("spline", 3)),
                         settings={transform: [{}, dict(block_m=16, block_hk=16, num_warps=4)] for transform in ("affine", "spline")})
    # coupling runs: 2 settings, and 2 column budgets for splines; training: per flow, the flow (layer steps, fused),
    # then 2 backward settings
    assert len(rows) == 2 * (2 + 2) + 2 + 5 + 1 + 2 + 4 + 4 + 2 * (2 + 2)
    assert all("ms" in row and row["ms"] > 0 for row in rows), rows
    assert all(row["max_error"] < 1e-3 for row in rows if row["kernel"] == "ode")
    summary = sweep.fastest_settings(rows)  # per kernel and size: 2 spline dims, affine, ode, 3 spline ops, 2 steps,
    # 2 layers, the two flows' training and backward
    assert len(summary) == 2 + 1 + 1 + 3 + 2 + 2 + 4 and all("fastest" in line for line in summary), summary
    # against the row without settings, not the first row timed (a failed default read a setting as the default)
    lines = sweep.fastest_settings([{"kernel": "k", "bf16": True, "ms": 100.0}, {"kernel": "k", "block_m": 32, "ms": 150.0}])
    assert lines == ["k: fastest {'bf16': True} 100.000 ms, default failed"]
    lines = sweep.fastest_settings([{"kernel": "k", "block_m": 32, "ms": 150.0}, {"kernel": "k", "ms": 200.0}])
    assert lines == ["k: fastest {'block_m': 32} 150.000 ms, 1.33x the default"]


@pytest.mark.triton
def test_op_counts_show_the_triton_paths_launch_less(monkeypatch, interpreter):
    """bench/count_ops.py: with the Triton kernels stubbed, the Triton backend's coupling flow launches fewer
    device operations than the reference, for log_prob and for log_prob + backward, with its conditioners fused
    (TF32: fewest; fewer still trained through the fused backward, opt-in on CUDA) or in torch (fp32)."""
    count_ops = _bench_script("count_ops")
    count_ops.stub_triton_kernels(monkeypatch.setattr)
    rows = {(transform, name): (forward, training) for transform, name, forward, training in count_ops.table(dim=4, rows=16)}
    for transform in ("spline", "affine"):
        reference = rows[(transform, "fastflow-reference")]
        for name in ("fastflow-triton", "fastflow-triton-fp32"):
            triton = rows[(transform, name)]
            assert 0 < triton[0] < reference[0] and 0 < triton[1] < reference[1], rows
        fused, steps = rows[(transform, "fastflow-triton")], rows[(transform, "fastflow-triton-fp32")]
        assert fused[0] < steps[0] and fused[1] <= steps[1]  # fused runs: fewer (trained through the same layer steps)
        fused_backward = rows[(transform, "fastflow-triton+fused-backward")]
        assert fused_backward[0] == fused[0] and fused_backward[1] < fused[1]  # (counted for the plain row before)
    assert count_ops.host_microseconds(lambda: None, calls=3, rounds=2) > 0


def test_gpu_profile_runs_the_named_cases_on_cpu():
    """bench/profile_gpu.py (run on GPU machines) on the quick CPU cases: wall time and launches (no device
    kernels on CPU), an implementation profiled with FASTFLOW_FUSED_BACKWARD=1 (its name suffixed), and a case that
    does not exist is reported as missing."""
    import os

    import torch

    profiler = _bench_script("profile_gpu")
    seen = []
    cases = profiler.profile_cases(torch.device("cpu"), [("coupling", "affine d=2 n=2048 log_prob", "fastflow-native")],
                                   quick=True)
    with mock.patch.object(profiler, "profile_call",
                           lambda fn, device: seen.append(os.environ.get("FASTFLOW_FUSED_BACKWARD")) or {"wall_ms": 1.0}):
        cases += profiler.profile_cases(torch.device("cpu"), [
            ("coupling", "affine d=2 n=2048 log_prob+backward", "fastflow-native+fused-backward"),
            ("coupling", "affine d=2 n=2048 nope", "fastflow-native")], quick=True)
    assert cases[0]["wall_ms"] > 0 and cases[0]["device_ms"] == 0 and cases[0]["launches"] == 0
    assert cases[1]["implementation"] == "fastflow-native+fused-backward" and seen == ["1"]
    assert cases[2]["missing"]


@pytest.mark.triton
def test_gpu_memcheck_cases_run_under_the_interpreter(monkeypatch, capsys, interpreter):
    """bench/memcheck_gpu.py's cases (sanitized on GPU machines) on tiny sizes on CPU: every call reports its
    error against the reference, and the errors are small."""
    import torch

    memcheck = _bench_script("memcheck_gpu")
    monkeypatch.setenv("FASTFLOW_FUSED_BACKWARD", "0")  # (restored after the cases set it)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        memcheck._coupling("affine", 3, rows=8, hidden=16, device="cpu")
        memcheck._coupling("spline", 3, rows=8, hidden=16, device="cpu")
        memcheck._ode(16, samples=8, device="cpu")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    calls = [json.loads(line[len("RESULT "):]) for line in capsys.readouterr().out.splitlines()
             if line.startswith("RESULT ")]
    assert len(calls) == 2 * 6 + 1 + 2 + 2 and all(call["max_error"] < 1e-3 for call in calls), calls


def test_memcheck_reads_the_sanitizer_verdict(tmp_path):
    """bench/memcheck_gpu.py's parent: the error count, the first invalid accesses and the calls' errors from
    the sanitized child's output (a stand-in sanitizer prints what compute-sanitizer printed on an H100)."""
    memcheck = _bench_script("memcheck_gpu")
    sanitizer = tmp_path / "compute-sanitizer"
    sanitizer.write_text("#!/bin/sh\n"
                         "echo 'RESULT {\"call\": \"log_prob tf32\", \"max_error\": 0.01}'\n"
                         "echo '========= Invalid __shared__ read of size 2048 bytes'\n"
                         "echo '=========     at _coupling_flow_backward_kernel+0xc380 in activations.py:39'\n"
                         "echo '========= ERROR SUMMARY: 10 errors'\n")
    sanitizer.chmod(0o755)
    row = memcheck.sanitize("coupling spline 8", sanitizer=str(sanitizer))
    assert row["sanitizer_errors"] == 10 and not row["timed_out"]
    assert row["first_invalid"][0].startswith("Invalid __shared__ read") and "_coupling_flow_backward_kernel" in row["first_invalid"][1]
    assert row["calls"] == [{"call": "log_prob tf32", "max_error": 0.01}]
    assert not row["clean"] and "output_tail" in row


@pytest.mark.parametrize("exit_status, result, clean", [(0, True, True), (1, True, False), (0, False, False)])
def test_memcheck_takes_a_case_that_crashed_for_unclean(tmp_path, exit_status, result, clean):
    """compute-sanitizer says "0 errors" of a child that raised (a Triton compile error): such a case read as a pass;
    a case is clean with no sanitizer error, exit status 0 and its calls reported."""
    memcheck = _bench_script("memcheck_gpu")
    sanitizer = tmp_path / "compute-sanitizer"
    sanitizer.write_text("#!/bin/sh\n" + ("echo 'RESULT {\"call\": \"log_prob tf32\", \"max_error\": 0.01}'\n" if result else "")
                         + "echo 'Traceback: CompilationError'\necho '========= ERROR SUMMARY: 0 errors'\n"
                         + f"exit {exit_status}\n")
    sanitizer.chmod(0o755)
    row = memcheck.sanitize("coupling affine 2", sanitizer=str(sanitizer))
    assert row["sanitizer_errors"] == 0 and row["returncode"] == exit_status and row["clean"] == clean
    assert clean or "CompilationError" in row["output_tail"]


def test_gpu_sweep_keeps_the_rows_of_a_sweep_that_dies(tmp_path, monkeypatch):
    """bench/sweep_gpu.py runs each sweep in its own process: the rows a child printed before it died (a CUDA fault
    ends its process) are kept, and its death is recorded with its last output."""
    sweep = _bench_script("sweep_gpu")
    child = tmp_path / "child.py"
    child.write_text("import sys\nprint('{\"kernel\": \"affine_flow_backward\", \"ms\": 1.5}')\n"
                     "print('torch.AcceleratorError: CUDA error: an illegal memory access was encountered')\nsys.exit(1)\n")
    monkeypatch.setattr(sweep, "__file__", str(child))
    rows = []
    sweep.sweep_in_children(["training"], rows)
    assert rows[0] == {"kernel": "affine_flow_backward", "ms": 1.5}
    assert rows[1]["sweep"] == "training" and rows[1]["exit"] == 1 and "illegal memory access" in rows[1]["error"]
