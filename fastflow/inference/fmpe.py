"""Flow matching posterior estimation (Dax et al. 2023): regress a velocity field v(t, θ_t, x) on the
conditional flow-matching target over simulated pairs (θ, x); the posterior is the CNF it defines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from fastflow.fm import CNF, OdeConfig, Path, VelocityMLP, cfm_loss, get_path
from fastflow.fm.paths import check_time_distribution
from fastflow.inference.npe import TrainingConfig, fit_posterior, preprocessing
from fastflow.inference.posterior import Posterior, register_estimator
from fastflow.priors import Prior

__all__ = ["FMPE", "VelocityConfig"]


@dataclass(frozen=True)
class VelocityConfig:
    """The velocity MLP of FMPE (see `fastflow.fm.VelocityMLP`)."""

    hidden: tuple[int, ...] = (128, 128, 128, 128)
    activation: str = "silu"
    num_frequencies: int = 4
    residual: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden": list(self.hidden)}


def build_fmpe_cnf(config: dict) -> CNF:
    """The FMPE estimator described by a saved config (statistics are placeholders until `load_state_dict`)."""
    dim_theta, dim_x = config["dim_theta"], config["dim_x"]
    transforms, embedding = preprocessing(dim_theta, dim_x, config["bounded"])
    network = {**config["network"], "hidden": tuple(config["network"]["hidden"])}
    velocity = VelocityMLP(dim_theta, context_dim=dim_x, **network)
    return CNF(velocity, dim_theta, context_dim=dim_x, transforms=transforms, embedding=embedding,
               sampler=OdeConfig(**config["sampler"]), likelihood=OdeConfig(**config["likelihood"]))


register_estimator("fmpe", build_fmpe_cnf)


@dataclass(frozen=True)
class _FlowMatchingLoss:
    path: Path
    time_distribution: str
    alpha: float

    def __call__(self, cnf: CNF, theta_1: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The loss on pairs as `_flow_space_pairs` maps them."""
        return cfm_loss(cnf.velocity, self.path, theta_1, context, time_distribution=self.time_distribution, alpha=self.alpha)


def _flow_space_pairs(cnf: CNF, theta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """θ `(N, D)` in the flow's space and x `(N, C)` embedded, once before training: both maps are fixed (the
    preprocessing statistics; ~0.3 ms a step when mapped per batch)."""
    with torch.no_grad():
        return cnf.to_flow_space(theta)[0], cnf.embed(x)


# Defaults measured on two_moons at 10^4 simulations (1 thread), mean C2ST over observations 1..5: 800 epochs
# of 512-pair batches with a 4×128 velocity MLP sampled by RK4 × 10 steps (40 evaluations; the same as 4×256
# sampled by Dopri5 1e-3, at a quarter of the cost per evaluation). Fewer evaluations cost accuracy (with an earlier
# training): RK4 × 5 0.631, midpoint × 5 0.636, Euler × 10 0.712 (4×128 for 200 epochs: 0.746).
# Training keeps the last weights of the cosine-annealed run unless it overfits. The flow-matching loss of 1,000
# validation pairs cannot rank nearby epochs: with new times and noise at each evaluation it varied by ±0.065
# between epochs, so the best epoch was picked by noise (seed 1: epoch 414 of 800), and even with the same draws at
# every evaluation (`fastflow.train.evaluate`) the best epoch of a full run scored worse than the last (seed 0:
# epoch 610, 0.570 against 0.542). Over seeds 0-3 of the simulations and the fit, on every pair: learning rate 1e-3
# with the best validation epoch 0.559 / 0.650 / 0.571 / 0.545, with the last 0.551 / 0.539 / 0.530 / 0.545; the
# last at 2e-3 0.535 / 0.530 / 0.529 / 0.530 and at 3e-3 (the default) 0.534 / 0.526 / 0.529 / 0.529; 400 epochs at
# 1e-3: 0.75, at 2e-3: 0.548 on average (max 0.564). But on slcp (8-D x) and gaussian_linear (10-D θ) the run
# memorizes its pairs: the validation loss bottoms out by epoch 36-134 and ends 10-40 % above it; the last weights
# score C2ST 0.929 / 0.957 on slcp (seeds 0 / 1, observations 1-3) and 0.763 on gaussian_linear (seed 0). So 10 %
# of the pairs validate (with the same draws at every epoch), and training stops with the best epoch's weights once
# the validation loss has risen past its best by more than 20 % of the improvement the best made on the first
# epoch's (`overfit_tolerance`). Over full runs, two_moons (seeds 0-3) rose 9 % of it at most, slcp and
# gaussian_linear (seeds 0-1) 32-68 %: they stop at epochs 340-514 (relative to the loss itself the rises do not
# separate: two_moons 8.5 % early on, gaussian_linear's overfitting 10 %). slcp 0.862 / 0.892 (sbi's FMPE: about
# 0.85), gaussian_linear 0.557 (NPE 0.538); two_moons never stops and loses little to the held-out pairs:
# 0.542 / 0.539 / 0.528 / 0.529 over seeds 0-3. The rise must last 10 epochs in a row (`overfit_patience`): on a
# posterior ~0.15 % of a wide box prior's width (1-D, x = θ + N(0, 0.03²), prior [-10, 10]) the loss jumped 2.5x for
# one epoch at epoch 22 of a run that went on improving 10-fold, and stopping there drew a posterior 6x too wide (41 %
# of the draws beyond 5 sds) where the full run's is 1.2-1.4x (IQR); over full runs the longest rise there lasted 1
# epoch. slcp (seeds 0-3) and gaussian_linear (seed 0) stop 10-37 epochs later, with the same best epochs, so the same
# weights.
# The loss runs with bfloat16 products on CPUs that multiply bfloat16 in hardware (mixed_precision "auto"): on an AMD
# EPYC with AVX512-BF16 training took 50.8 s against 66.0 s (two_moons, seed 0, 800 epochs, 1 thread, one process), and
# scored as float32: two_moons 0.530 / 0.541 / 0.531 (seeds 0-2), slcp 0.861 (stopping at epoch 350 instead of 343),
# gaussian_linear 0.555 (509 instead of 514).
# Training times: p(t) = 2t (power, alpha 0). dingo's usual weighting, p(t) ∝ t^4 (alpha = -0.75 here; see
# `fastflow.fm.sample_time`), scored worse on seed 0: two_moons 0.633 against 0.530, slcp 0.876 against 0.861.
# The sampler multiplies the velocity's hidden layers in bfloat16 on those CPUs too (mixed_precision "auto",
# `VelocityMLP.sampling_field`): 10^4 draws in 0.385 s against 0.571 s in float32 on two_moons (C2ST 0.535, observations
# 1-5; 0.534 before), 0.431 s against 0.674 s on gaussian_linear (0.554, observations 1-3; 0.556 before); the draws move
# by ~1e-3 of the posterior's spread on average (same noise). log_prob integrates in float32.
# The sampler's steps shrink toward the data end (spacing 2.5: times 1 - (1 - u)^2.5): a posterior narrow in the flow's
# space is reached within the last ~its spread of time, which even steps straddled. A posterior ~1 % of a wide box
# prior's width (2-D, x = Aθ + N(0, 0.1²), prior [-10, 10]², exact correlation -0.80, spread ~0.013 in the flow's
# space) came out under-confident with even steps (correlation -0.40 / -0.46 at two observations, 28-31 % of the draws
# in the exact 50 % region) and right with these (-0.77 / -0.78, 49-51 %; Dopri5 at 1e-5: -0.77 / -0.78), the same
# trained model. C2ST with the same models and noise, even steps against spacing 2.5 (Dopri5 1e-5): two_moons seeds
# 0 / 1 0.530 / 0.540 against 0.517 / 0.527 (0.518 / 0.528), slcp 0.909 / 0.874 against 0.909 / 0.874, gaussian_linear
# 0.556 against 0.554 (spacing 1.5-3 within 0.004 of each other).
FMPE_SAMPLER = OdeConfig(method="rk4", steps=10, mixed_precision="auto", spacing=2.5)
FMPE_LIKELIHOOD = OdeConfig(method="dopri5", rtol=1e-5, atol=1e-5)
FMPE_TRAINING = TrainingConfig(max_epochs=800, patience=800, validation_fraction=0.1, keep="last", overfit_tolerance=0.2,
                               mixed_precision="auto")


@dataclass
class FMPE:
    """Flow matching posterior estimation.

    θ is mapped to unconstrained space where the prior's support has finite bounds, then z-scored; x is z-scored
    (the same preprocessing as `NPE`). `fit(theta, x)` trains and returns a `Posterior` whose estimator is a `CNF`.

    Arguments:
        prior: the prior θ was drawn from.
        network: the velocity MLP.
        path: a `fastflow.fm.Path` (default: conditional OT with sigma_min = 1e-3).
        time_distribution, alpha: training times, "uniform" or "power" (p(t) ∝ t^(1/(1+alpha))).
        training: optimizer and stopping options (default `FMPE_TRAINING`: 800 cosine-annealed epochs keeping the
            last weights, unless the loss on 10 % of the pairs, held out, stays above its best by 20 % of what
            training gained on it for 10 epochs: then training stops with the best epoch's weights, as the model
            memorizes its pairs).
        sampler, likelihood: ODE options of `sample` and `log_prob` (default `FMPE_SAMPLER`: RK4, 10 steps shrinking
            toward the data end (`spacing` 2.5), the hidden layers in bfloat16 on CPUs that multiply it in hardware;
            `FMPE_LIKELIHOOD`: Dopri5 at 1e-5, float32).
        seed: seed of the initialization and the minibatch order.
        device: training device (default CPU).
        progress: show a progress bar.
    """

    prior: Prior
    network: VelocityConfig = field(default_factory=VelocityConfig)
    path: Path = field(default_factory=lambda: get_path("ot", sigma_min=1e-3))
    time_distribution: str = "power"
    alpha: float = 0.0
    training: TrainingConfig = field(default_factory=lambda: FMPE_TRAINING)
    sampler: OdeConfig = FMPE_SAMPLER
    likelihood: OdeConfig = FMPE_LIKELIHOOD
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        check_time_distribution(self.time_distribution, self.alpha)  # before any simulation or training

    def fit(self, theta: torch.Tensor, x: torch.Tensor) -> Posterior:
        """Train on pairs θ `(N, D)`, x `(N, C)`; returns the `Posterior` (its `history` holds the losses)."""
        settings = {"network": self.network.to_dict(), "sampler": self.sampler.to_dict(),
                    "likelihood": self.likelihood.to_dict()}
        loss = _FlowMatchingLoss(self.path, self.time_distribution, self.alpha)
        return fit_posterior("fmpe", build_fmpe_cnf, loss, self.prior, theta, x, settings=settings,
                             training=self.training, seed=self.seed, device=self.device, progress=self.progress,
                             prepare=_flow_space_pairs)
