"""Environments of multi-turn episodes: the protocol (``base``), tools and tool-call
parsing, and adapters for OpenEnv servers and reasoning-gym tasks.

The adapters are imported on first use: ``import jaxpt.envs`` stays as light as the
protocol, and works without openenv-core and reasoning-gym (using an adapter without its
package is an ImportError naming the extra to install).
"""

import importlib

from jaxpt.envs.base import AssistantTurn, Environment, EnvStep, ToolCall

_LAZY = {
    "OpenEnvEnvironment": "jaxpt.envs.openenv",
    "ReasoningGymEnv": "jaxpt.envs.reasoning_gym",
    "reasoning_gym_reward": "jaxpt.rewards.reasoning_gym",
    "reasoning_gym_rows": "jaxpt.data.reasoning_gym",
}

__all__ = [
    "AssistantTurn",
    "EnvStep",
    "Environment",
    "OpenEnvEnvironment",
    "ReasoningGymEnv",
    "ToolCall",
    "reasoning_gym_reward",
    "reasoning_gym_rows",
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxpt.envs' has no attribute {name!r}")
