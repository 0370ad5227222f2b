"""Metrics that compare a sample with a reference: classifier two-sample test and MMD."""

from fastflow.metrics.two_sample import c2st, mmd

__all__ = ["c2st", "mmd"]
