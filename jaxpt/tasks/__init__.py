"""Task registry: each module ``jaxpt.tasks.<name>`` defines ``TASK = Task(...)``.

Adding a task (rm, dpo, grpo, ppo) is adding one module; the config schema, the CLI's
``--help`` and the loop pick it up by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from jaxpt.tasks.base import (
    BatchSource,
    LossOutput,
    RunContext,
    StepContext,
    Task,
    loss_evaluator,
    safe_ratio,
)

_NOT_TASKS = {"base"}


def available_tasks() -> list[str]:
    """Names of the task modules in this package, sorted."""
    return sorted(
        m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")
        and m.name not in _NOT_TASKS
    )


def get_task(name: str) -> Task:
    """The ``Task`` record of a task module."""
    if name not in available_tasks():
        raise KeyError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    task = importlib.import_module(f"jaxpt.tasks.{name}").TASK
    if task.name != name:
        raise ValueError(f"jaxpt.tasks.{name}.TASK is named {task.name!r}")
    return task


__all__ = [
    "BatchSource",
    "LossOutput",
    "RunContext",
    "StepContext",
    "Task",
    "available_tasks",
    "get_task",
    "loss_evaluator",
    "safe_ratio",
]
