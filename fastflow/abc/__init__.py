"""Approximate Bayesian computation: chunked Numba rejection (Dask-capable) and regression adjustment."""

from fastflow.abc.posterior import abc_posterior_samples
from fastflow.abc.regression import LLRegression
from fastflow.abc.rejection import RejectionResult, rejection

__all__ = ["LLRegression", "RejectionResult", "abc_posterior_samples", "rejection"]
