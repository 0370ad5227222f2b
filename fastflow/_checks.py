"""Argument checks shared across the package."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_floating", "check_seed", "floating_tensor", "nonnegative_int", "positive_finite", "positive_int",
           "real_tensor"]


def positive_int(value, name: str) -> int:
    """`value` as an int when it is a positive integer (Python or numpy, not a bool); else a ValueError naming it."""
    return _int_from(value, name, 1, "a positive int")


def nonnegative_int(value, name: str) -> int:
    """`value` as an int when it is an integer >= 0 (Python or numpy, not a bool); else a ValueError naming it."""
    return _int_from(value, name, 0, "a non-negative int")


def positive_finite(value, name: str) -> float:
    """`value` as a float when it is a finite real number > 0 (not a bool); else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


# torch's CPU generator keeps 32 bits of a seed: seeds 0 and 2**32 gave the same flows, fits and draws (and 2**64
# overflowed inside torch)
MAX_SEED = 2**32 - 1


def check_seed(value) -> int:
    """`value` as an int seed in 0 … 2**32 - 1 (Python or numpy integers); else a ValueError."""
    seed = nonnegative_int(value, "seed")
    if seed > MAX_SEED:
        raise ValueError(f"seed must be at most 2**32 - 1 (torch's generator keeps 32 bits of a seed), got {value!r}")
    return seed


def check_floating(dtype, what: str) -> None:
    """A TypeError unless the torch `dtype` is a real floating one (integers, booleans and complex numbers are
    refused: some ops failed deep inside torch on them, others returned complex numbers)."""
    if not dtype.is_floating_point:
        raise TypeError(f"{what} must be float16/bfloat16/float32/float64 tensors, got {dtype}")


def real_tensor(values, name: str):
    """`values` (a tensor, array or nested sequence) as a torch tensor; a TypeError for complex numbers, which a
    cast to a real dtype would silently drop the imaginary parts of. Arrays with negative strides (`a[::-1]`, which
    torch refuses) are copied."""
    import numpy as np
    import torch

    if isinstance(values, np.ndarray) and any(stride < 0 for stride in values.strides):
        values = np.ascontiguousarray(values)
    tensor = torch.as_tensor(values)
    if tensor.is_complex():
        raise TypeError(f"{name} must be real, got {tensor.dtype}")
    return tensor


def floating_tensor(values, name: str):
    """`values` as a float32 or float64 tensor (`real_tensor`'s checks): integers and booleans in torch's default
    dtype, half precisions as float32 (bfloat16 has no numpy dtype, and some CPU kernels have no half version)."""
    import torch

    tensor = real_tensor(values, name)
    if not tensor.is_floating_point():
        return tensor.to(torch.get_default_dtype())
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _int_from(value, name: str, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)
