"""The backend dispatcher: availability report, automatic choice, forcing by argument or environment."""

import importlib
import importlib.util

import pytest
import torch

import fastflow
from fastflow.backends import (
    BACKENDS, BackendStatus, backends, is_automatic, native_module, resolve_backend, set_num_threads, triton_precision,
)

backends_module = importlib.import_module("fastflow.backends")  # the module; fastflow.backends is the function
triton_installed = importlib.util.find_spec("triton") is not None


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def no_extension(monkeypatch):
    """The dispatcher as seen on an install where neither fastflow._C nor fastflow._C_cuda was built."""

    def missing(name):
        return None, f"fastflow.{name} is not importable (simulated); {backends_module._INSTALL_HINT}"

    monkeypatch.setattr(backends_module, "_STATUS", {})
    monkeypatch.setattr(backends_module, "_import_extension", missing)
    yield


def test_report_lists_every_backend_with_a_reason():
    report = backends()
    assert set(report) == set(BACKENDS)
    for name, status in report.items():
        assert isinstance(status, BackendStatus)
        assert status.name == name
        assert isinstance(status.reason, str) and status.reason
        assert status.available == bool(status.devices)
        assert set(status.devices) <= {"cpu", "cuda"}
    assert report["reference"].available and "cpu" in report["reference"].devices


def test_package_exports():
    assert fastflow.backends is backends
    assert fastflow.resolve_backend is resolve_backend


def test_native_cpu_is_built_here():
    # The extension is part of every install (make install / pip install .): missing means a broken build.
    status = backends()["native"]
    assert "cpu" in status.devices, status.reason
    assert native_module("cpu") is fastflow._C


def test_triton_on_cpu_needs_the_interpreter():
    status = backends()["triton"]
    if not torch.cuda.is_available():
        assert "cpu" not in status.devices
        assert ("not installed" in status.reason) if not triton_installed else ("TRITON_INTERPRET" in status.reason)


@pytest.mark.skipif(not triton_installed, reason="triton is not installed")
def test_triton_interpreter_on_cpu_is_available_but_never_automatic(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "cpu" in backends()["triton"].devices
    assert resolve_backend(None, "cpu") == "native"
    assert resolve_backend("triton", "cpu") == "triton"
    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    assert resolve_backend("auto", "cpu") == "triton"


def test_auto_on_cpu_picks_native_then_reference():
    assert resolve_backend(None, "cpu") == "native"
    assert resolve_backend("auto", torch.device("cpu")) == "native"
    assert resolve_backend(None, "cpu", supports=("reference", "triton")) == "reference"
    assert resolve_backend("auto", "cpu", supports=("reference",)) == "reference"


def test_auto_without_extension_falls_back_to_reference(no_extension):
    assert resolve_backend(None, "cpu") == "reference"
    assert not backends()["native"].available


def test_forcing_by_argument():
    assert resolve_backend("reference", "cpu") == "reference"
    assert resolve_backend("native", "cpu") == "native"


def test_environment_overrides_auto_but_not_an_explicit_argument(monkeypatch):
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    assert resolve_backend(None, "cpu") == "reference"
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("native", "cpu") == "native"


def test_environment_auto_is_automatic(monkeypatch):
    monkeypatch.setenv("FASTFLOW_BACKEND", "auto")
    assert resolve_backend(None, "cpu") == "native"


def test_forcing_an_unavailable_backend_raises_with_the_reason(no_extension, monkeypatch):
    reason = backends()["native"].reason
    with pytest.raises(RuntimeError, match="cannot run on cpu") as error:
        resolve_backend("native", "cpu")
    assert reason in str(error.value) and "pip install" in str(error.value)
    monkeypatch.setenv("FASTFLOW_BACKEND", "native")
    with pytest.raises(RuntimeError, match="FASTFLOW_BACKEND"):
        resolve_backend(None, "cpu")


def test_native_module_raises_the_install_hint_when_not_built(no_extension):
    with pytest.raises(RuntimeError, match="pip install"):
        native_module("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_cuda_backends_unavailable_without_a_device():
    for name in ("native", "triton"):
        with pytest.raises(RuntimeError, match=f"{name!r}.*cannot run on cuda"):
            resolve_backend(name, "cuda")
    with pytest.raises(RuntimeError, match="no backend .* cuda"):
        resolve_backend(None, "cuda")


def test_forcing_a_backend_the_op_does_not_implement():
    with pytest.raises(RuntimeError, match="does not implement"):
        resolve_backend("native", "cpu", supports=("reference",))


def test_unknown_name_lists_the_known_ones(monkeypatch):
    with pytest.raises(ValueError, match="reference.*triton.*native"):
        resolve_backend("cuda", "cpu")
    monkeypatch.setenv("FASTFLOW_BACKEND", "fast")
    with pytest.raises(ValueError, match="'fast'.*FASTFLOW_BACKEND"):
        resolve_backend(None, "cpu")


def test_build_info_is_consistent():
    info = fastflow._C.build_info()
    assert set(info) >= {"openmp", "omp_max_threads", "compiler", "version"}
    assert isinstance(info["openmp"], bool)
    assert info["omp_max_threads"] >= 1
    assert info["version"] == fastflow.__version__
    assert info["compiler"]
    assert ("OpenMP" in backends()["native"].reason) == info["openmp"]


def test_set_num_threads_sets_torch_and_openmp():
    before = torch.get_num_threads()
    try:
        set_num_threads(2)
        assert torch.get_num_threads() == 2
        if fastflow._C.build_info()["openmp"]:
            assert fastflow._C.build_info()["omp_max_threads"] == 2
    finally:
        set_num_threads(before)
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="positive int"):
            set_num_threads(bad)


def test_set_num_threads_reaches_numba_when_abc_runs():
    """In a fresh process: the ABC kernels ran on every core after set_num_threads(1), and starting Numba's threading
    layer reset torch's count to every core as well. The count reaches Numba when ABC runs, and set_num_threads does
    not start Numba's layer (a layer chosen after it was ignored)."""
    import subprocess
    import sys

    script = ("import numba, torch, fastflow\n"
              "from fastflow.abc import rejection\n"
              "from fastflow.tasks import get_task\n"
              "fastflow.set_num_threads(1)\n"
              "numba.config.THREADING_LAYER = 'workqueue'\n"
              "task = get_task('two_moons')\n"
              "rejection(task, task.prior, task.observation(1), 2000, quantile=0.05)\n"
              "print(torch.get_num_threads(), numba.get_num_threads(), numba.threading_layer())\n")
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert output.split() == ["1", "1", "workqueue"]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernels_thread_count_holds_in_every_thread(threads):
    """omp_set_num_threads set the count for the calling thread only: kernels called from another Python thread
    (a DataLoader worker, a thread pool) ran on every core after set_num_threads(1)."""
    import threading

    expected = threads if fastflow._C.build_info()["openmp"] else 1  # (without OpenMP every kernel runs serially)
    before = torch.get_num_threads()
    seen = []
    try:
        set_num_threads(threads)
        worker = threading.Thread(target=lambda: seen.append(fastflow._C.kernel_region_threads()))
        worker.start()
        worker.join()
        assert seen == [expected] and fastflow._C.kernel_region_threads() == expected
    finally:
        set_num_threads(before)


@pytest.mark.gpu
def test_native_is_not_listed_on_cuda():
    """The CUDA module holds device queries only: native was listed as running on CUDA, where every native op
    refuses its tensors; "auto" takes Triton, then the reference."""
    assert backends()["native"].devices == ("cpu",)
    assert resolve_backend(None, "cuda", supports=("native", "reference")) == "reference"


def test_cuda_module_when_built():
    cuda = pytest.importorskip("fastflow._C_cuda", reason="built without a CUDA compiler")
    count = cuda.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    assert (count > 0) >= torch.cuda.is_available()
    info = cuda.build_info()
    assert info["cuda_runtime_version"] >= 11000
    assert info["version"] == fastflow.__version__


def test_triton_precision_follows_torch_on_cuda_only():
    previous = torch.backends.cuda.matmul.allow_tf32  # a property of torch's cuBLAS module: set and restore
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert triton_precision(None, "cuda") == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert triton_precision(None, "cuda") == "tf32"
        assert triton_precision(None, "cpu") == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert triton_precision("tf32x3", "cuda") == "tf32x3"
    with pytest.raises(ValueError, match="precision must be one of"):
        triton_precision("bf16", "cuda")


def test_is_automatic_reads_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)
    assert is_automatic(None) and is_automatic("auto") and not is_automatic("triton")
    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    assert not is_automatic(None) and not is_automatic("reference")
    monkeypatch.setenv("FASTFLOW_BACKEND", "auto")
    assert is_automatic(None)
