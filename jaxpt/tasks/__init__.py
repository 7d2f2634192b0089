"""Task registry: the tasks a run can name with its ``task`` config key.

A task is a ``Task`` record (``jaxpt.tasks.base``). The shipped ones live in modules
``jaxpt.tasks.<name>`` that define ``TASK = Task(...)`` and are imported on first use. A
user's module adds its own with ``register_task`` at import time::

    # mypkg/tasks.py
    from jaxpt.tasks import Task, register_task

    TASK = register_task(Task(name="my_task", config_cls=MyTaskConfig, ...))

and a run imports it through the root config key ``imports: [mypkg.tasks]``; from then on
the config schema (a ``my_task:`` section), ``python -m jaxpt.train --help`` and the loop
see ``my_task`` like a shipped task. Importing a task module has no side effects beyond
defining (and, for a user's task, registering) it.
"""

from __future__ import annotations

import importlib

from jaxpt.tasks.base import BatchSource, BuiltModel, RunContext, Task

# Task name -> its ``Task`` record, or the module whose ``TASK`` it is (imported lazily).
TASKS: dict[str, str | Task] = {
    "sft": "jaxpt.tasks.sft",
    "rm": "jaxpt.tasks.rm",
    "prm": "jaxpt.tasks.prm",
    "dpo": "jaxpt.tasks.dpo",
    "kto": "jaxpt.tasks.kto",
    "distill": "jaxpt.tasks.distill",
    "online_dpo": "jaxpt.tasks.online_dpo",
    "grpo": "jaxpt.tasks.grpo",
    "ppo": "jaxpt.tasks.ppo",
}


def register_task(task: Task | str, *, replace: bool = False) -> Task:
    """Add a task to the registry: a ``Task`` record, or the import path of a module that
    defines ``TASK``; returns the ``Task``.

    The name becomes the value of the ``task`` config key and the name of the task's config
    section, so it must be a Python identifier. Registering the same task again is a no-op;
    another task under a taken name is a ``ValueError`` unless ``replace=True``.
    """
    if isinstance(task, str):
        task = _task_of_module(task)
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task or a module path, got {task!r}")
    if not task.name.isidentifier():
        raise ValueError(f"task name {task.name!r} must be a Python identifier")
    existing = TASKS.get(task.name)
    if existing is not None and not replace:
        current = _task_of_module(existing) if isinstance(existing, str) else existing
        if current is not task:
            raise ValueError(
                f"a task named {task.name!r} is already registered ({_origin(existing)}); "
                "pass replace=True to replace it"
            )
    TASKS[task.name] = task
    return task


def available_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The ``Task`` record of a registered task."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    entry = TASKS[name]
    task = _task_of_module(entry) if isinstance(entry, str) else entry
    if task.name != name:
        raise ValueError(f"{_origin(entry)}: the task registered as {name!r} is named {task.name!r}")
    return task


def config_sections() -> dict[str, type]:
    """Each task's config dataclass by task name: one section of the root config each."""
    return {name: get_task(name).config_cls for name in available_tasks()}


def _task_of_module(module_path: str) -> Task:
    task = getattr(importlib.import_module(module_path), "TASK", None)
    if not isinstance(task, Task):
        raise TypeError(f"module {module_path!r} defines no TASK = Task(...)")
    return task


def _origin(entry: str | Task) -> str:
    if isinstance(entry, str):
        return f"{entry}.TASK"
    module = getattr(entry.build, "__module__", None)
    return f"defined in {module}" if module else "a Task record"


__all__ = [
    "TASKS",
    "BatchSource",
    "BuiltModel",
    "RunContext",
    "Task",
    "available_tasks",
    "config_sections",
    "get_task",
    "register_task",
]
