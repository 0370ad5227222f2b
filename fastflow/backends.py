"""Backend dispatch: which implementation of a fused op runs — `reference` (PyTorch), `triton`
(kernels/, CUDA tensors, or CPU under TRITON_INTERPRET=1) or `native` (fastflow._C, CPU tensors; fastflow._C_cuda,
built when nvcc is found, holds device queries only: no native kernel runs on CUDA).

`resolve_backend` picks the fastest available one for a device (`"auto"`), or the one forced by the
argument or the `FASTFLOW_BACKEND` environment variable; a forced backend that cannot run raises
with the reason instead of falling back.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import torch

from fastflow._checks import positive_int

__all__ = ["BACKENDS", "BackendStatus", "backends", "check_backend_name", "device_key", "native_module", "resolve_backend", "set_num_threads",
           "triton_precision", "is_automatic", "requested_backend", "triton_device", "AUTO_TRITON_PRECISIONS",
           "autocast_off", "bf16_products", "check_mixed_precision", "cpu_has_bf16_products", "in_own_dtype"]

BACKENDS = ("reference", "triton", "native")
_INSTALL_HINT = "reinstall fastflow with `pip install .` (or `make install`) so that the C++ extension is built"


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, on which devices, and why not."""

    name: str
    available: bool
    reason: str
    devices: tuple[str, ...]


@lru_cache(maxsize=None)
def _import_extension(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(f"fastflow.{name}"), ""
    except ImportError as error:
        return None, f"fastflow.{name} is not importable ({error}); {_INSTALL_HINT}"


def _cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


_STATUS: dict[bool, dict[str, BackendStatus]] = {}  # TRITON_INTERPRET set -> `backends()`, computed once


def backends() -> dict[str, BackendStatus]:
    """What each backend can do on this machine, with the reason where it cannot. (Ops resolve on every call: the
    status is computed once per value of TRITON_INTERPRET, in a plain dict that torch.compile reads as a constant
    once it is filled: `lru_cache` would be traced through, extension imports included.)"""
    triton_interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if triton_interpret not in _STATUS:
        _STATUS[triton_interpret] = _backends(triton_interpret)
    return dict(_STATUS[triton_interpret])


def _backends(triton_interpret: bool) -> dict[str, BackendStatus]:
    """`backends()` for one value of TRITON_INTERPRET."""
    status = {"reference": BackendStatus("reference", True, "plain PyTorch", ("cpu", "cuda") if _cuda_devices() else ("cpu",))}

    native_devices, native_reasons = [], []
    cpu_module, cpu_reason = _import_extension("_C")
    if cpu_module is not None:
        info = cpu_module.build_info()
        native_devices.append("cpu")
        native_reasons.append(f"C++ ({'OpenMP, ' + str(info['omp_max_threads']) + ' threads' if info['openmp'] else 'no OpenMP'})")
    else:
        native_reasons.append(cpu_reason)
    cuda_module, cuda_reason = _import_extension("_C_cuda")
    if cuda_module is None and importlib.util.find_spec("fastflow._C_cuda") is None:
        native_reasons.append("no CUDA module: fastflow was built without a CUDA compiler (nvcc)")
    elif cuda_module is None:
        native_reasons.append(cuda_reason)
    elif cuda_module.cuda_device_count() == 0 or not _cuda_devices():
        native_reasons.append("CUDA module built, but no CUDA device is visible")
    else:  # (it was listed as a native device, though no native kernel runs there)
        native_reasons.append("CUDA module built (device queries only: the native kernels run on CPU tensors)")
    status["native"] = BackendStatus("native", bool(native_devices), "; ".join(native_reasons), tuple(native_devices))

    if importlib.util.find_spec("triton") is None:
        status["triton"] = BackendStatus("triton", False, "triton is not installed (pip install 'fastflow[triton]')", ())
    elif _cuda_devices():
        status["triton"] = BackendStatus("triton", True, "Triton on CUDA", ("cuda",))
    elif triton_interpret:
        status["triton"] = BackendStatus("triton", True, "Triton interpreter on CPU (TRITON_INTERPRET=1; for tests, slow)", ("cpu",))
    else:
        status["triton"] = BackendStatus("triton", False, "no CUDA device (set TRITON_INTERPRET=1 to interpret kernels on CPU)", ())
    return status


def resolve_backend(
    requested: str | None,
    device: torch.device | str,
    *,
    supports: tuple[str, ...] = BACKENDS,
    why: dict[str, str | None] | None = None,
) -> str:
    """The backend an op runs with on `device`.

    Arguments:
        requested: None or "auto" (then `FASTFLOW_BACKEND` if set, else automatic), or a backend name.
        device: where the op's tensors live.
        supports: the backends this op (for these dtypes) implements.
        why: for the error when a backend outside `supports` is forced: why this op cannot run on it, by name.

    Raises:
        ValueError: unknown backend name. RuntimeError: a forced backend cannot run here, with why.
    """
    device_type = torch.device(device).type
    source = "argument" if requested not in (None, "auto") else "FASTFLOW_BACKEND"
    requested = check_backend_name(requested_backend(requested), source)
    status = backends()
    if requested == "auto":
        preference = ("triton", "native", "reference") if device_type == "cuda" else ("native", "reference")
        for name in preference:
            if name in supports and device_type in status[name].devices:
                return name
        reasons = "; ".join(f"{name}: {status[name].reason}" for name in preference if name in supports)
        raise RuntimeError(f"no backend among {supports} runs on {device_type} here ({reasons})")
    if requested not in supports:
        raise RuntimeError(f"backend {requested!r} (from the {source}) does not implement this op for these inputs"
                           f"{f' ({why[requested]})' if why and why.get(requested) else ''}; it supports {supports}")
    if device_type not in status[requested].devices:
        raise RuntimeError(f"backend {requested!r} (from the {source}) cannot run on {device_type}: {status[requested].reason}")
    return requested


TRITON_PRECISIONS = ("ieee", "tf32", "tf32x3")
# The products' precisions for which automatic dispatch takes the fused ODE kernel on CUDA. Measured on an
# H200 and an H100 (bench/results/gpu_ode_2026-11-26_*.json, 100 steps of 10^6 samples): with "ieee" (fp32 on CUDA
# cores) the fused kernels ran 2-3.5x slower than the PyTorch reference (cuBLAS fp32), with "tf32x3" 3.7-4.2x slower
# for RK4 and at 3x256 (1.3-1.5x faster only for Euler at 3x64); with "tf32" 1.4-2.6x faster at 3x256, 3.0-16x at 3x64
# (the two machines' earlier and later kernels).
# (Coupling layers with fp32 products run their conditioner in torch instead: `ops.coupling.fuses_conditioner`.)
AUTO_TRITON_PRECISIONS = ("tf32",)


def triton_precision(precision: str | None, device: torch.device | str) -> str:
    """The input precision of a Triton kernel's fp32 products: "ieee" (fp32 on CUDA cores), "tf32" (tensor
    cores, 10-bit mantissas) or "tf32x3" (three TF32 products, about fp32's accuracy). None follows
    `torch.backends.cuda.matmul.allow_tf32` on CUDA, as torch's own matmuls do ("ieee" elsewhere)."""
    if precision is None:
        return "tf32" if torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if precision not in TRITON_PRECISIONS:
        raise ValueError(f"precision must be one of {TRITON_PRECISIONS}, got {precision!r}")
    return precision


def device_key(tensor: torch.Tensor) -> int | str:
    """What tells `tensor`'s device apart, cheaply on the hot path: the CUDA index, else the device type ("cpu",
    "meta", ...; `get_device()` is -1 for all of those)."""
    index = tensor.get_device()
    return index if index >= 0 else tensor.device.type


def triton_device(device: torch.device | str) -> bool:
    """Whether Triton kernels can take tensors on `device`: CUDA, or CPU under TRITON_INTERPRET=1."""
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def check_backend_name(name: str | None, source: str = "argument") -> str | None:
    """`name` when it is None, "auto" or one of `BACKENDS`; else a ValueError naming where it came from."""
    if name is not None and name not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown backend {name!r} (from the {source}); choose one of {('auto', *BACKENDS)}")
    return name


def requested_backend(requested: str | None) -> str:
    """The backend `resolve_backend(requested, ...)` is asked for: the argument, else FASTFLOW_BACKEND, else "auto"."""
    if requested in (None, "auto"):
        return os.environ.get("FASTFLOW_BACKEND") or "auto"
    return requested


def is_automatic(requested: str | None) -> bool:
    """Whether `resolve_backend(requested, ...)` chooses automatically (no backend named, nor FASTFLOW_BACKEND)."""
    return requested_backend(requested) == "auto"


def native_module(device: torch.device | str) -> ModuleType:
    """The compiled module for `device`: `fastflow._C` (CPU) or `fastflow._C_cuda` (CUDA)."""
    name = "_C_cuda" if torch.device(device).type == "cuda" else "_C"
    module, reason = _import_extension(name)
    if module is None:
        raise RuntimeError(reason)
    return module


_THREADS: int | None = None  # the count set by `set_num_threads`, applied to Numba when ABC's kernels run


def set_num_threads(n: int) -> None:
    """Use `n` threads in PyTorch, in the OpenMP kernels of fastflow._C (every thread's calls) and in the Numba
    kernels of ABC (`numba_threads`, when they run: starting Numba's threading layer here made forked workers abort)."""
    global _THREADS
    n = positive_int(n, "thread count")
    _THREADS = n
    torch.set_num_threads(n)
    module, _ = _import_extension("_C")
    if module is not None:
        module.set_num_threads(n)


@lru_cache(maxsize=None)
def cpu_has_bf16_products() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86's AVX512-BF16 or AMX-BF16 flags in /proc/cpuinfo):
    there torch's bfloat16 matrix products run about twice as fast as float32 ones (on an AMD EPYC with AVX512-BF16,
    512x128 by 128x128: 91 µs against 171 µs); elsewhere they are emulated. False off Linux."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_mixed_precision(mixed_precision: str) -> str:
    """A `mixed_precision` option as given: "off", "bf16" or "auto" (bfloat16 where `bf16_products` says so)."""
    if mixed_precision not in ("off", "bf16", "auto"):
        raise ValueError(f"mixed_precision must be 'off', 'bf16' or 'auto', got {mixed_precision!r}")
    return mixed_precision


def bf16_products(mixed_precision: str, device: torch.device) -> bool:
    """Whether a `mixed_precision` option means bfloat16 products on `device`: "bf16" anywhere, "auto" on CPUs that
    multiply bfloat16 in hardware (`cpu_has_bf16_products`), "off" never; other values raise."""
    return check_mixed_precision(mixed_precision) == "bf16" or (
        mixed_precision == "auto" and device.type == "cpu" and cpu_has_bf16_products())


def numba_threads() -> None:
    """Give Numba's parallel kernels (ABC) the count of `set_num_threads`, if it was called (for this thread: Numba
    keeps the count per thread), and keep torch's: starting Numba's threading layer resets the OpenMP count torch
    shares (the ABC kernels ran on every core after set_num_threads(1), and torch went back to every core)."""
    if _THREADS is None:
        return
    import numba

    numba.set_num_threads(min(_THREADS, numba.config.NUMBA_NUM_THREADS))  # (starts the layer if it has not started)
    torch.set_num_threads(_THREADS)


@contextlib.contextmanager
def autograd_recording():
    """Autograd records inside, also under a caller's `torch.no_grad()` or `torch.inference_mode()`: tensors made
    inside are normal ones (training, MAP and divergences need gradients). A decorator too (`@autograd_recording()`)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context turning a caller's autocast off on `device_type` (a no-op context where none is on: entering an
    autocast costs ~3 µs): flows and coupling layers run in their parameters' dtype, since the native and Triton ops
    take float32/64 (under a bfloat16 autocast the conditioners' bf16 outputs reached them) and densities need it."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else contextlib.nullcontext()


def in_own_dtype(method):
    """Decorate a method to run with a caller's autocast off on the devices fastflow runs on (CPU and CUDA): flows and
    CNFs run in their parameters' dtype (`autocast_off`)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        with autocast_off("cpu"), autocast_off("cuda"):
            return method(*args, **kwargs)

    return run
