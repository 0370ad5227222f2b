"""The registry of benchmark tasks: `get_task(name)` and the tuple `TASKS` of known names."""

from __future__ import annotations

import functools

from fastflow.tasks.gaussian_linear import gaussian_linear
from fastflow.tasks.gaussian_mixture import gaussian_mixture
from fastflow.tasks.slcp import slcp
from fastflow.tasks.task import Task
from fastflow.tasks.two_moons import two_moons

__all__ = ["TASKS", "get_task"]

_BUILDERS = {
    "two_moons": two_moons,
    "gaussian_linear": gaussian_linear,
    "gaussian_mixture": gaussian_mixture,
    "slcp": slcp,
}
TASKS: tuple[str, ...] = tuple(_BUILDERS)


def get_task(name: str) -> Task:
    """The task registered as `name` (one shared instance per name, so its caches are shared too).

    Raises:
        ValueError: `name` is not one of `TASKS`.
    """
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return _build(name)


@functools.lru_cache(maxsize=None)
def _build(name: str) -> Task:
    return _BUILDERS[name]()
