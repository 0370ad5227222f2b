"""Flow matching: probability paths and the CFM loss, velocity networks, batched ODE solvers, and
continuous normalizing flows (sampling and log-likelihood)."""

from fastflow.fm.cnf import CNF, OdeConfig
from fastflow.fm.divergence import (DIVERGENCES, DeterministicDivergence, Divergence, ExactDivergence,
                                    HutchinsonDivergence, as_divergence, exact_divergence, hutchinson_divergence,
                                    mlp_divergence)
from fastflow.fm.fused import mlp_odeint
from fastflow.fm.nets import TimeEmbedding, VelocityMLP
from fastflow.fm.pairing import PAIRINGS, ot_pairing
from fastflow.fm.paths import (PATHS, CondOTPath, CosinePath, LinearInterpolant, Path, TrigInterpolant, VPPath,
                               cfm_loss, get_path, sample_time)
from fastflow.fm.solvers import SOLVERS, ButcherTableau, OdeSolution, odeint

__all__ = [
    "CNF", "DIVERGENCES", "DeterministicDivergence", "Divergence", "ExactDivergence", "HutchinsonDivergence",
    "OdeConfig", "as_divergence", "exact_divergence", "hutchinson_divergence", "mlp_divergence",
    "PAIRINGS", "PATHS", "SOLVERS", "ButcherTableau", "CondOTPath", "CosinePath", "LinearInterpolant", "OdeSolution", "Path",
    "TimeEmbedding", "TrigInterpolant", "VPPath", "VelocityMLP", "cfm_loss", "get_path", "mlp_odeint", "odeint",
    "ot_pairing", "sample_time",
]
