"""Argument checks shared across the package."""

from __future__ import annotations

import numbers

__all__ = ["positive_int"]


def positive_int(value, name: str) -> int:
    """`value` as an int when it is a positive integer (Python or numpy, not a bool); else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)
