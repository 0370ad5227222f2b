"""Base distributions of a flow: the standard Gaussian and a trainable diagonal Gaussian mixture."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["StandardNormal", "GaussianMixture"]

_LOG_2PI = math.log(2.0 * math.pi)


class StandardNormal(nn.Module):
    """N(0, I) over `(dim,)`."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("_anchor", torch.zeros(()))  # carries device and dtype

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """`(N, dim)` → `(N,)`: -(|z|² + dim·log 2π) / 2 in two ops (each op is a launch on a GPU)."""
        return torch.rsub(torch.linalg.vecdot(z, z), -0.5 * self.dim * _LOG_2PI, alpha=0.5)

    def rsample(self, n: int) -> torch.Tensor:
        """`(n, dim)` draws."""
        return torch.randn(n, self.dim, device=self._anchor.device, dtype=self._anchor.dtype)


class GaussianMixture(nn.Module):
    """Mixture of K diagonal Gaussians with learnable weights, means and scales.

    Matching K to the number of posterior modes avoids the thin density bridges that a unimodal
    base forces a flow to draw between modes. `rsample` is pathwise in the means and scales given the
    drawn components (the weights get no gradient through it; they learn through `log_prob`).

    Arguments:
        dim: dimension; num_components: K; seed: seed of the initial means.
        spread: standard deviation of the initial means; None: √(2/dim), at most 1, so that they start about 2
            apart in any dimension (with spread 1 they started √(2·dim) apart: in 10-D a unimodal posterior was
            split over far-apart components, KL(p‖q) 0.41 against 0.22 on gaussian_linear at 10^4 simulations).
    """

    def __init__(self, dim: int, num_components: int, *, spread: float | None = None, seed: int = 0):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        spread = min(1.0, math.sqrt(2.0 / dim)) if spread is None else spread
        generator = torch.Generator().manual_seed(seed)
        self.dim, self.num_components = dim, num_components
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.means = nn.Parameter(spread * torch.randn(num_components, dim, generator=generator))
        self.log_scales = nn.Parameter(torch.zeros(num_components, dim))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """`(N, dim)` → `(N,)`."""
        standardized = (z.unsqueeze(-2) - self.means) * torch.exp(-self.log_scales)
        component = -0.5 * (standardized.square().sum(-1) + self.dim * _LOG_2PI) - self.log_scales.sum(-1)
        return torch.logsumexp(component + torch.log_softmax(self.logits, -1), dim=-1)

    def rsample(self, n: int) -> torch.Tensor:
        """`(n, dim)` draws."""
        if n == 0:  # (multinomial refuses to draw none)
            return self.means.new_empty(0, self.dim)
        index = torch.multinomial(torch.softmax(self.logits.detach(), -1), n, replacement=True)
        eps = torch.randn(n, self.dim, device=self.means.device, dtype=self.means.dtype)
        return self.means[index] + eps * torch.exp(self.log_scales[index])
