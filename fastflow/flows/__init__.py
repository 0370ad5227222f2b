"""Normalizing flows: transforms, coupling layers, bases and the `Flow` distribution."""

from fastflow.flows.bases import GaussianMixture, StandardNormal
from fastflow.flows.build import FlowConfig, build_flow
from fastflow.nn.coupling import MLP, AffineCoupling, SplineCoupling
from fastflow.flows.flow import Flow
from fastflow.flows.transforms import BoxToReal, LULinear, RandomPermutation, ReversePermutation, Standardize, Transform

__all__ = [
    "AffineCoupling",
    "BoxToReal",
    "Flow",
    "FlowConfig",
    "GaussianMixture",
    "LULinear",
    "MLP",
    "RandomPermutation",
    "ReversePermutation",
    "SplineCoupling",
    "StandardNormal",
    "Standardize",
    "Transform",
    "build_flow",
]
