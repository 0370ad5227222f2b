"""Drop-in flow layers for any PyTorch model: coupling layers and a coupling-flow stack whose kernels
are chosen per call by `backend=` (identical parameters and state_dict on every backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastflow.flows.flow import Flow
from fastflow.nn.coupling import MLP, AffineCoupling, SplineCoupling

if TYPE_CHECKING:
    from fastflow.flows.build import FlowConfig

__all__ = ["MLP", "AffineCoupling", "CouplingFlow", "SplineCoupling"]


class CouplingFlow(Flow):
    """A stack of coupling layers and permutations over a base distribution, as `build_flow` makes it.

    Arguments:
        dim: data dimension; context_dim: conditioning dimension (0: unconditional).
        config: the architecture (`FlowConfig`: transform, layers, widths, bins, permutation, base).
        backend: kernel backend of the coupling layers (None: automatic).
    """

    def __init__(self, dim: int, context_dim: int = 0, *, config: FlowConfig | None = None, backend: str | None = None):
        from fastflow.flows.build import FlowConfig, build_flow  # fastflow.flows imports this package

        built = build_flow(config or FlowConfig(), dim, context_dim, backend=backend)
        super().__init__(list(built.transforms), built.base, context_dim=context_dim)
