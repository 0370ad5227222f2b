"""`Flow`: a (conditional) normalizing flow q(θ | context) with a torch.distributions-style API."""

from __future__ import annotations

import torch
import torch.nn as nn

from fastflow._checks import positive_int, real_tensor
from fastflow.backends import backends, in_own_dtype
from fastflow.flows.transforms import Transform
from fastflow.ops.coupling_flow import chain_transforms

__all__ = ["Flow"]


class Flow(nn.Module):
    """A chain of `Transform`s (data → latent) on top of a base distribution.

    Contexts broadcast: `log_prob(θ (N, D), context (C,) or (N, C))`; `sample(n, context (C,))` gives
    `(n, D)` and `sample(n, context (B, C))` gives `(n, B, D)` — every draw for every context in one batch.
    It runs in its parameters' dtype: a caller's autocast is off inside.

    Arguments:
        transforms: bijections applied in order from data to latent.
        base: module with `log_prob((N, D)) → (N,)` and `rsample(n) → (n, D)`.
        context_dim: dimension of the conditioning variable (0: unconditional).
        embedding: optional module applied to the context before the transforms (e.g. a fixed
            standardization or a summary network); it maps `(B, context_dim)` to the transforms' context.
    """

    def __init__(self, transforms: list[Transform], base: nn.Module, *, context_dim: int = 0, embedding: nn.Module | None = None):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)
        self.base = base
        self.dim = base.dim
        self.context_dim = context_dim
        self.embedding = embedding if embedding is not None else nn.Identity()
        self._chains: dict[bool, tuple] = {}
        # built here, outside any torch.compile trace: dispatch then reads the backends' status and the runs of
        # layers as constants, so a first call under torch.compile(fullgraph=True) traces in one graph
        backends()
        for inverse in (False, True):
            self._chain(inverse)

    def _chain(self, inverse: bool) -> list:
        """The transforms in execution order as steps `(x, context) -> (x, log|det J|)`, runs of coupling layers
        fused into one launch where they can be (`fastflow.ops.coupling_flow`); rebuilt when `transforms` or a
        layer's backend changes."""
        key = tuple((id(t), t.__dict__.get("backend")) for t in self.transforms)  # (no nn.Module.__getattr__ miss)
        cached = self._chains.get(inverse)
        if cached is None or cached[0] != key:
            cached = self._chains[inverse] = (key, chain_transforms(list(self.transforms), inverse))
        return cached[1]

    # -- input handling -------------------------------------------------------------------------
    def _embed(self, context: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Embedded context with the context's batch shape: `(*, C)` → `(*, E)`, cast to `dtype` (the flow's)
        before the embedding."""
        if self.context_dim == 0:
            if context is not None:
                raise ValueError("this flow is unconditional: pass no context")
            return None
        if context is None:
            raise ValueError(f"this flow needs a context of dim {self.context_dim}")
        if context.dim() == 0 or context.shape[-1] != self.context_dim:
            raise ValueError(f"context must have last dimension {self.context_dim}, got {tuple(context.shape)}")
        embedded = self.embedding(real_tensor(context, "context").reshape(-1, self.context_dim).to(dtype))
        return embedded.reshape(*context.shape[:-1], embedded.shape[-1])

    # -- density ----------------------------------------------------------------------------------
    @in_own_dtype
    def log_prob(self, theta: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """log q(θ | context) for θ `(*, D)`; context `(C,)`, or `(*, C)` matching θ's batch shape."""
        if theta.dim() == 0 or theta.shape[-1] != self.dim:
            raise ValueError(f"θ must have last dimension {self.dim}, got {tuple(theta.shape)}")
        parameter = next(self.parameters(), None)
        if parameter is not None and theta.dtype != parameter.dtype:  # (torch's "mat1 and mat2" error deep inside)
            raise ValueError(f"θ is {theta.dtype} but the flow's parameters are {parameter.dtype} (convert one with .to())")
        batch_shape = theta.shape[:-1]
        x = theta.reshape(-1, self.dim)
        embedded = self._embed(context, x.dtype)
        if embedded is not None:
            try:
                embedded = embedded.expand(*batch_shape, embedded.shape[-1])
            except RuntimeError:
                raise ValueError(
                    f"context batch shape {tuple(context.shape[:-1])} does not broadcast to θ batch shape {tuple(batch_shape)}"
                ) from None
            embedded = embedded.reshape(x.shape[0], embedded.shape[-1])
        log_q = None
        for step in self._chain(inverse=False):
            x, ladj = step(x, embedded)
            log_q = ladj if log_q is None else log_q + ladj
        log_q = self.base.log_prob(x) if log_q is None else self.base.log_prob(x) + log_q
        return log_q.reshape(batch_shape)

    # -- sampling ---------------------------------------------------------------------------------
    @in_own_dtype
    def _sample(self, n: int, context: torch.Tensor | None,
                with_log_prob: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draws and (when `with_log_prob`; else None) their log q, shaped as `sample_and_log_prob`'s."""
        n = positive_int(n, "number of samples")
        if context is not None and context.dim() > 2:
            raise ValueError(f"sampling takes a context (C,) or (B, C), got {tuple(context.shape)}")
        contexts = context.shape[0] if context is not None and context.dim() == 2 else 1
        z = self.base.rsample(n * contexts)
        embedded = self._embed(context, z.dtype)
        log_q = self.base.log_prob(z) if with_log_prob else None
        if embedded is not None:
            width = embedded.shape[-1]
            embedded = embedded.reshape(contexts, width).unsqueeze(0).expand(n, -1, -1).reshape(n * contexts, width)
        for step in self._chain(inverse=True):
            z, ladj = step(z, embedded)
            if with_log_prob:
                log_q = log_q - ladj
        if context is not None and context.dim() == 2:
            return z.reshape(n, contexts, self.dim), None if log_q is None else log_q.reshape(n, contexts)
        return z, log_q

    def rsample(self, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """Reparametrized draws `(n, D)` or `(n, B, D)`, differentiable in the transforms' parameters and the base's
        location and scale parameters (not a mixture base's weights: a draw's component is picked, not differentiated)."""
        return self._sample(n, context, with_log_prob=False)[0]

    @torch.no_grad()
    def sample(self, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """Draws `(n, D)` or `(n, B, D)`, without gradients."""
        return self._sample(n, context, with_log_prob=False)[0]

    def sample_and_log_prob(self, n: int, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws and their log q in one pass: `(n, [B,] D)` and `(n, [B])`."""
        return self._sample(n, context)
