"""Environments by name or import path, and the factory a run builds them with."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from jaxpt.envs.imports import import_object

BUILTIN = {
    "tools": "jaxpt.envs.tool_env:ToolEnv",
    "openenv": "jaxpt.envs.openenv:OpenEnvEnvironment",
    "reasoning_gym": "jaxpt.envs.reasoning_gym:ReasoningGymEnv",
}


def env_class(spec: str) -> type:
    """The environment class a built-in name (``tools``, ``openenv``, ``reasoning_gym``) or
    an import path ``pkg.module:Class`` names."""
    path = BUILTIN.get(spec, spec)
    if ":" not in path:
        raise ValueError(f"environment {spec!r} is neither a built-in ({sorted(BUILTIN)}) nor "
                         "an import path 'package.module:Class'")
    cls = import_object(path, "environment")
    if not callable(cls):
        raise TypeError(f"environment {spec!r} is not a class or factory")
    return cls


def env_factory(envs, *, without_tools: bool = False) -> Callable[[], object]:
    """A function building one environment per episode from an ``envs`` config section:
    ``spec`` with ``kwargs``; an environment that takes ``tools`` gets the section's tools
    (none with ``without_tools``: calls then fail as unknown tools) and one shared
    ``ToolRunner`` with the section's limits."""
    from jaxpt.envs.tools import ToolRunner, python_tool, resolve_tools

    cls = env_class(envs.spec or "tools")
    kwargs = dict(envs.kwargs)
    try:
        accepted = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_all = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    if "tools" in accepted or takes_all:
        specs = list(envs.tools) or list(kwargs.pop("tools", []))
        # The python tool's sandbox takes the section's time limit as its own.
        specs = [python_tool(timeout_s=envs.tool_timeout_s) if s == "python" else s
                 for s in specs]
        tools = [] if without_tools else resolve_tools(specs)
        kwargs.pop("tools", None)
        kwargs["tools"] = tools
        if "runner" in accepted:
            kwargs["runner"] = ToolRunner(tools, timeout_s=envs.tool_timeout_s,
                                          max_output_chars=envs.max_tool_output_chars,
                                          max_calls_per_turn=envs.max_tool_calls_per_turn,
                                          max_workers=envs.max_parallel)
    elif envs.tools:
        raise ValueError(f"envs.tools is set but environment {envs.spec!r} takes no 'tools'")
    try:
        inspect.signature(cls).bind(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"envs.kwargs do not fit environment {envs.spec!r}: {error}") from None
    return lambda: cls(**kwargs)
