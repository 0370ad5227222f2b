"""Metrics: a sample against a reference (classifier two-sample test, MMD), and a posterior's calibration over
simulated datasets (SBC ranks, their uniformity, expected coverage)."""

from fastflow.metrics.calibration import expected_coverage, sbc_ranks, sbc_uniformity
from fastflow.metrics.two_sample import c2st, mmd

__all__ = ["c2st", "expected_coverage", "mmd", "sbc_ranks", "sbc_uniformity"]
