"""Task registry: each task module ``jaxpt.tasks.<name>`` defines ``TASK = Task(...)``.

``TASKS`` names every task and the module that holds it; the config schema, the CLI's
``--help`` and the loop look tasks up here. Importing a task module has no side effects
beyond defining it. Adding a task (say ``ppo``) is one module plus one line below.
"""

from __future__ import annotations

import importlib

from jaxpt.tasks.base import BatchSource, BuiltModel, RunContext, Task

TASKS: dict[str, str] = {
    "sft": "jaxpt.tasks.sft",
    "rm": "jaxpt.tasks.rm",
    "dpo": "jaxpt.tasks.dpo",
    "grpo": "jaxpt.tasks.grpo",
    "ppo": "jaxpt.tasks.ppo",
}


def available_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The ``Task`` record of a registered task."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    task = importlib.import_module(TASKS[name]).TASK
    if task.name != name:
        raise ValueError(f"{TASKS[name]}.TASK is named {task.name!r}")
    return task


def config_sections() -> dict[str, type]:
    """Each task's config dataclass by task name: one section of the root config each."""
    return {name: get_task(name).config_cls for name in available_tasks()}


__all__ = [
    "TASKS",
    "BatchSource",
    "BuiltModel",
    "RunContext",
    "Task",
    "available_tasks",
    "config_sections",
    "get_task",
]
