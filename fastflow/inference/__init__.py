"""Amortized simulation-based inference: simulation, estimators and the `Posterior`."""

from fastflow.inference.npe import NPE, TrainingConfig
from fastflow.inference.posterior import Posterior
from fastflow.inference.simulate import Simulations, simulate

__all__ = ["NPE", "Posterior", "Simulations", "TrainingConfig", "simulate"]
