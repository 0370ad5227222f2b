"""Type stub of fastflow._C, the C++/OpenMP extension (built from csrc/; no libtorch).

Kernels take numpy views of CPU tensors (`t.detach().numpy()`, zero-copy), C-contiguous, of one
float dtype (float32 or float64), and write into the preallocated output arrays.
"""

from typing import TypedDict

import numpy as np
import numpy.typing as npt

_Float = np.float32 | np.float64

class BuildInfo(TypedDict):
    openmp: bool
    omp_max_threads: int
    compiler: str
    version: str

def build_info() -> BuildInfo:
    """How this module was built: OpenMP, its maximum thread count, compiler, fastflow version."""

def set_num_threads(n: int) -> None:
    """Set the OpenMP thread count of the kernels (n >= 1), for calls from every thread."""

def kernel_region_threads() -> int:
    """The threads of a kernel's parallel region started from the calling thread (1 without OpenMP)."""

def rq_spline_forward(
    x: npt.NDArray[_Float],
    params: npt.NDArray[_Float],
    out: npt.NDArray[_Float],
    ladj: npt.NDArray[_Float],
    bound: float,
    inverse: bool,
    derivative_shift: float,
    isa: str = "auto",
) -> None:
    """Rational-quadratic spline: x (n,), params (n, 3K-1) -> out (n,), ladj (n,) (log|det J|), vectorized
    across elements in the storage precision; `isa` picks the build ("auto": the best of `spline_isas()`)."""

def rq_spline_rows_forward(
    x: npt.NDArray[_Float],
    params: npt.NDArray[_Float],
    out: npt.NDArray[_Float],
    ladj: npt.NDArray[_Float],
    num_bins: int,
    bound: float,
    inverse: bool,
    derivative_shift: float,
    isa: str = "auto",
) -> None:
    """A coupling layer's spline: x, out (rows, count); params (rows, row_stride) whose row r starts with its
    count parameter vectors (3K-1 each; padding after); ladj (rows,) gets each row's sum of log|det J|."""

def spline_isas() -> list[str]:
    """Instruction sets of the blocked spline kernels this CPU runs, best first ("x86_64_v3", "generic")."""

def rq_spline_backward(
    x: npt.NDArray[_Float],
    params: npt.NDArray[_Float],
    grad_out: npt.NDArray[_Float],
    grad_ladj: npt.NDArray[_Float],
    grad_x: npt.NDArray[_Float],
    grad_params: npt.NDArray[_Float],
    bound: float,
    inverse: bool,
    derivative_shift: float,
    isa: str = "auto",
) -> None:
    """Backward of rq_spline_forward: fills grad_x (n,) and grad_params (n, 3K-1)."""

