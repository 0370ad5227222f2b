"""Amortized simulation-based inference: simulation, estimators and the `Posterior`."""

from fastflow.inference.fmpe import FMPE, VelocityConfig
from fastflow.inference.npe import NPE, TrainingConfig
from fastflow.inference.posterior import Posterior
from fastflow.inference.simulate import Simulations, simulate

__all__ = ["FMPE", "NPE", "Posterior", "Simulations", "TrainingConfig", "VelocityConfig", "simulate"]
