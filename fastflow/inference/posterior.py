"""`Posterior`: a trained conditional density q(θ | x) with sampling, densities, moments, quantiles
and MAP, batched over several observations, and saved as weights plus a plain config."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from fastflow._checks import nonnegative_int, positive_int, real_tensor
from fastflow.backends import autograd_recording
from fastflow.priors import Prior, prior_from_config

__all__ = ["Posterior", "register_estimator", "FORMAT", "FORMAT_VERSION"]

FORMAT = "fastflow.posterior"
FORMAT_VERSION = 1
_BUILDERS: dict[str, Callable[[dict], nn.Module]] = {}


def register_estimator(method: str, builder: Callable[[dict], nn.Module]) -> None:
    """Declare how `Posterior.load` rebuilds the estimator of `method` from its saved config."""
    _BUILDERS[method] = builder


class Posterior:
    """q(θ | x) from an amortized estimator, restricted to the prior's support.

    Observations are `(C,)` for one x or `(B, C)` for B of them; results then gain a `B` axis after
    the sample axis: `sample(n, x (B, C))` is `(n, B, D)`, `mean(x (B, C))` is `(B, D)`.

    Arguments:
        estimator: module with `log_prob(θ, x)` and `sample(n, x)` (a conditional `Flow`, …).
        prior: the prior the estimator was trained under.
        config: plain data from which the registered builder of `config["method"]` rebuilds the estimator.
    """

    def __init__(self, estimator: nn.Module, prior: Prior, *, config: dict):
        self.estimator = estimator.eval()
        self.prior = prior
        self.config = config
        self.dim_theta = int(config["dim_theta"])
        self.dim_x = int(config["dim_x"])
        self.history = None

    # -- validation -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.estimator.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The estimator's dtype: θ and x are evaluated in it."""
        return next(self.estimator.parameters()).dtype

    def _check_x(self, x) -> torch.Tensor:
        x = real_tensor(x, "x").to(device=self.device, dtype=self.dtype)
        if x.dim() not in (1, 2) or x.shape[-1] != self.dim_x:
            raise ValueError(f"x must have shape ({self.dim_x},) or (B, {self.dim_x}); got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf")
        return x

    def to(self, device) -> "Posterior":
        self.estimator.to(device)
        return self

    # -- sampling and density ---------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, x) -> torch.Tensor:
        """`n` draws of θ: `(n, D)` for x `(C,)`, `(n, B, D)` for x `(B, C)`."""
        n = positive_int(n, "number of samples")
        samples = self.estimator.sample(n, self._check_x(x))
        finite = torch.isfinite(samples).all(-1)
        if not finite.all():  # (one check per call, after the sampling)
            warnings.warn(f"{int((~finite).sum())} of {finite.numel()} posterior samples are NaN or inf: the estimator "
                          "is broken for this x (did training diverge?)", RuntimeWarning, stacklevel=2)
        return samples

    @torch.no_grad()
    def log_prob(self, theta, x) -> torch.Tensor:
        """log q(θ | x), `-inf` outside the prior support.

        θ `(*, D)` with x `(C,)`, or x `(B, C)` expanding to θ's batch shape, which ends in B (θ `(B, D)` or
        `(n, B, D)`); `(*,)`. The prior's support is tested on θ as given (a float64 θ just outside a box stays
        outside), the density in the estimator's dtype."""
        return self._log_prob(real_tensor(theta, "θ").to(self.device), self._check_x(x))

    def _log_prob(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if theta.dim() == 0 or theta.shape[-1] != self.dim_theta:
            raise ValueError(f"θ must have last dimension {self.dim_theta}; got {tuple(theta.shape)}")
        cast = theta.to(self.dtype)
        if not torch.isfinite(cast).all():  # (a float64 1e39 is inf in a float32 estimator)
            raise ValueError(f"θ contains NaN or inf (in the estimator's {self.dtype})")
        log_q = self.estimator.log_prob(cast, x)
        return log_q.masked_fill(~self.prior.in_support(theta), -math.inf)

    # -- summaries --------------------------------------------------------------------------------
    def mean(self, x, *, num_samples: int = 10_000) -> torch.Tensor:
        """Posterior mean by Monte Carlo: `(D,)` or `(B, D)`."""
        return self.sample(num_samples, x).mean(0)

    def var(self, x, *, num_samples: int = 10_000) -> torch.Tensor:
        """Marginal posterior variances by Monte Carlo (`num_samples` >= 2): `(D,)` or `(B, D)`."""
        if positive_int(num_samples, "num_samples") < 2:
            raise ValueError("a variance needs num_samples >= 2")
        return self.sample(num_samples, x).var(0)

    def quantile(self, q, x, *, num_samples: int = 10_000) -> torch.Tensor:
        """Marginal quantiles at levels `q` (scalar or `(Q,)` in [0, 1]): `([Q,] [B,] D)`."""
        levels = real_tensor(q, "q").to(device=self.device, dtype=self.dtype)
        if not torch.isfinite(levels).all() or (levels < 0).any() or (levels > 1).any():
            raise ValueError(f"quantile levels must lie in [0, 1], got {q}")
        return torch.quantile(self.sample(num_samples, x), levels, dim=0)

    def map(self, x, *, num_samples: int = 1_000, num_starts: int = 10, steps: int = 200, learning_rate: float = 0.05) -> torch.Tensor:
        """Maximum a posteriori θ: gradient ascent (Adam, `steps` steps) on log q(θ | x) from the best `num_starts` of
        `num_samples` posterior draws (in standardized coordinates, kept inside the prior support); the best point
        seen, starts included, is returned (a step may overshoot).

        Returns `(D,)` or `(B, D)`.
        """
        num_samples, num_starts = positive_int(num_samples, "num_samples"), positive_int(num_starts, "num_starts")
        steps = nonnegative_int(steps, "steps")
        # gradient ascent also when called under no_grad or inference_mode (x cloned: a caller's inference tensor
        # cannot be saved for backward)
        with autograd_recording():
            return self._map(self._check_x(x).clone(), num_samples, num_starts, steps, learning_rate)

    def _map(self, x: torch.Tensor, num_samples: int, num_starts: int, steps: int, learning_rate: float) -> torch.Tensor:
        single = x.dim() == 1
        xs = x.reshape(-1, self.dim_x)
        with torch.no_grad():
            draws = self.estimator.sample(num_samples, xs)  # (n, B, D)
            log_q = self._log_prob(draws, xs)
        best_log_q, top = log_q.topk(min(num_starts, num_samples), dim=0)  # (starts, B)
        best = draws.gather(0, top.unsqueeze(-1).expand(-1, -1, self.dim_theta))  # (starts, B, D)
        center, scale = draws.mean(0), draws.std(0).nan_to_num(1.0).clamp_min(1e-6)
        low, high = self.prior.low.to(draws), self.prior.high.to(draws)
        margin = 1e-5 * (high - low).nan_to_num(nan=0.0, posinf=0.0)
        standardized = ((best - center) / scale).requires_grad_(True)
        optimizer = torch.optim.Adam([standardized], lr=learning_rate)
        for step in range(steps + 1):
            theta = center + scale * standardized
            with torch.set_grad_enabled(step < steps):  # the last point is scored only
                log_q = self.estimator.log_prob(theta, xs)
            with torch.no_grad():
                better = log_q.masked_fill(~self.prior.in_support(theta), -math.inf) > best_log_q
                best_log_q = torch.where(better, log_q, best_log_q)
                best = torch.where(better.unsqueeze(-1), theta, best)
            if step == steps:
                break
            # the gradient for θ alone: the estimator's parameters (and their requires_grad) are left as they are
            standardized.grad, = torch.autograd.grad(-log_q.sum(), standardized)
            optimizer.step()
            with torch.no_grad():
                clamped = torch.maximum(torch.minimum(center + scale * standardized, high - margin), low + margin)
                standardized.copy_((clamped - center) / scale)
        result = best[best_log_q.argmax(0), torch.arange(xs.shape[0])]
        return result[0] if single else result

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write weights and a plain config (no pickled code) to `path`."""
        torch.save(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "config": _plain(self.config),
                "prior": self.prior.config(),
                "state_dict": {k: v.detach().cpu() for k, v in self.estimator.state_dict().items()},
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> "Posterior":
        """Read a posterior written by `save` (with `torch.load(weights_only=True)`)."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:  # a missing or unreadable file says so itself
            raise
        except Exception as error:  # torch's unpickler fails on other files with any of many errors (KeyError, EOFError, ...)
            raise ValueError(f"{path} is not a saved fastflow posterior ({error!r})") from error
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saved fastflow posterior")
        version = payload.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path} was saved in posterior format version {version}; this fastflow reads version {FORMAT_VERSION}: "
                "retrain, or load it with the fastflow release that wrote it"
            )
        config = payload["config"]
        method = config.get("method")
        if method not in _BUILDERS:
            raise ValueError(f"{path} holds a posterior of unknown method {method!r}; known: {sorted(_BUILDERS)}")
        with torch.inference_mode(False):  # (built under a caller's inference_mode, the weights could never train or map)
            estimator = _BUILDERS[method](config)
            estimator.load_state_dict(payload["state_dict"])
            estimator.to(device)  # (a copy to another device would be made of inference tensors too)
        return cls(estimator, prior_from_config(payload["prior"]), config=config)


def _plain(value):
    """`value` with numpy scalars as Python numbers, recursively through dicts, lists and tuples: what
    `torch.load(weights_only=True)` reads back (a numpy learning rate made a saved posterior unloadable)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value.item() if isinstance(value, np.generic) else value
