"""Type stub of fastflow._C_cuda, the CUDA extension (built only when nvcc is found; cudart static)."""

from typing import TypedDict

class BuildInfo(TypedDict):
    cuda_runtime_version: int
    version: str

def cuda_device_count() -> int:
    """Number of visible CUDA devices; 0 without a driver or device (never raises)."""

def build_info() -> BuildInfo:
    """The CUDA runtime version (CUDART_VERSION, e.g. 13000) compiled against, fastflow version."""
