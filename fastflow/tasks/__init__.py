"""Benchmark tasks (sbibm definitions) with priors, batched simulators and reference posteriors."""

from fastflow.tasks.registry import TASKS, get_task
from fastflow.tasks.task import Task

__all__ = ["TASKS", "Task", "get_task"]
