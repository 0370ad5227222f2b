"""fastflow: fast normalizing flows, flow matching and simulation-based inference for PyTorch."""

from fastflow.backends import backends, resolve_backend, set_num_threads

__version__ = "0.1.0"
__all__ = ["backends", "resolve_backend", "set_num_threads", "__version__"]
