"""Builders: a plain `FlowConfig` (saved with models) and `build_flow`, which turns it into a `Flow`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn

from fastflow._checks import check_seed, positive_finite, positive_int
from fastflow.flows.bases import GaussianMixture, StandardNormal
from fastflow.nn.coupling import AffineCoupling, SplineCoupling
from fastflow.ops.spline import check_num_bins
from fastflow.flows.flow import Flow
from fastflow.flows.transforms import LULinear, RandomPermutation, ReversePermutation, Transform

__all__ = ["FlowConfig", "build_flow"]

TRANSFORMS = ("spline", "affine")
PERMUTATIONS = ("reverse", "random", "lu")
BASES = ("gaussian", "gmm")


@dataclass(frozen=True)
class FlowConfig:
    """Architecture of a coupling flow.

    transform: "spline" (NSF) or "affine" (RealNVP); num_layers coupling layers, each followed by a
    permutation ("reverse", "random" or trainable "lu"); conditioner MLPs with `depth` hidden layers of
    width `hidden`; splines with `num_bins` bins on [-bound, bound]; base "gaussian" or "gmm" with
    `num_components`. `seed` draws the random permutations and the mixture's initial means; the conditioners'
    initial weights come from torch's global RNG, as any `nn.Module`'s (NPE and FMPE seed it with their `seed`).
    """

    transform: str = "spline"
    num_layers: int = 5
    hidden: int = 64
    depth: int = 2
    num_bins: int = 8
    bound: float = 4.0
    permutation: str = "reverse"
    base: str = "gaussian"
    num_components: int = 2
    seed: int = 0

    def __post_init__(self):
        for name, value, allowed in (
            ("transform", self.transform, TRANSFORMS),
            ("permutation", self.permutation, PERMUTATIONS),
            ("base", self.base, BASES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}")
        for name in ("num_layers", "hidden", "depth", "num_components"):
            object.__setattr__(self, name, positive_int(getattr(self, name), name))  # (numpy integers become ints)
        object.__setattr__(self, "num_bins", check_num_bins(self.num_bins))
        # (a NaN bound made every spline the identity; a numpy one made saved posteriors unloadable)
        object.__setattr__(self, "bound", positive_finite(self.bound, "bound"))
        object.__setattr__(self, "seed", check_seed(self.seed))  # (1.5 and 2**64 failed inside torch at build time)

    def to_dict(self) -> dict:
        return asdict(self)


def _permutation(config: FlowConfig, dim: int, layer: int) -> Transform:
    if config.permutation == "lu":
        return LULinear(dim)
    if config.permutation == "random":
        return RandomPermutation(dim, seed=config.seed + layer, split=dim // 2)
    return ReversePermutation(dim)


def build_flow(
    config: FlowConfig,
    dim: int,
    context_dim: int = 0,
    *,
    preprocess: list[Transform] | None = None,
    embedding: nn.Module | None = None,
    embedding_dim: int | None = None,
    backend: str | None = None,
) -> Flow:
    """Build the flow q(θ | context) described by `config`.

    Arguments:
        dim: dimension of θ; context_dim: dimension of the raw context (0: unconditional).
        preprocess: fixed bijections applied first (e.g. box-to-real, standardization).
        embedding: module applied to the context; embedding_dim: its output width (default context_dim).
        backend: kernel backend of the coupling layers (None: automatic per call, see `fastflow.backends`).
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    conditioning = context_dim if embedding_dim is None else embedding_dim
    transforms: list[Transform] = list(preprocess or [])
    for layer in range(config.num_layers):
        flip = layer % 2 == 1 and config.permutation == "lu" and dim > 1  # (1-D: flipped layers would change nothing)
        if config.transform == "spline":
            coupling = SplineCoupling(
                dim, conditioning, flip=flip, hidden=config.hidden, depth=config.depth, num_bins=config.num_bins, bound=config.bound,
                backend=backend,
            )
        else:
            coupling = AffineCoupling(dim, conditioning, flip=flip, hidden=config.hidden, depth=config.depth, backend=backend)
        transforms.append(coupling)
        if layer < config.num_layers - 1 and dim > 1:
            transforms.append(_permutation(config, dim, layer))
    if config.base == "gmm":
        base = GaussianMixture(dim, config.num_components, seed=config.seed)
    else:
        base = StandardNormal(dim)
    return Flow(transforms, base, context_dim=context_dim, embedding=embedding)
