"""fastflow: fast normalizing flows, flow matching and simulation-based inference for PyTorch."""

__version__ = "0.1.0"
