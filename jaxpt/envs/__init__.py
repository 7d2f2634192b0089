"""Environments of multi-turn episodes: the protocol (``base``), tools and tool-call
parsing, ``ToolEnv``, and adapters for OpenEnv servers and reasoning-gym tasks.

The adapters are imported on first use: ``import jaxpt.envs`` stays as light as the
protocol, and works without openenv-core and reasoning-gym (using an adapter without its
package is an ImportError naming the extra to install).
"""

import importlib

from jaxpt.envs.base import AssistantTurn, Environment, EnvStep, ToolCall
from jaxpt.envs.parsers import (
    PARSERS,
    Parser,
    parse_hermes,
    parse_llama3_json,
    parse_mistral,
    parser_for,
)
from jaxpt.envs.tool_env import ToolEnv
from jaxpt.envs.tools import (
    BUILTIN_TOOLS,
    ERROR_KINDS,
    Tool,
    ToolError,
    ToolResult,
    ToolRunner,
    as_tool,
    calculator,
    python_tool,
    resolve_tools,
    tool_messages,
)

_LAZY = {
    "OpenEnvEnvironment": "jaxpt.envs.openenv",
    "ReasoningGymEnv": "jaxpt.envs.reasoning_gym",
    "reasoning_gym_reward": "jaxpt.rewards.reasoning_gym",
    "reasoning_gym_rows": "jaxpt.data.reasoning_gym",
}

__all__ = [
    "BUILTIN_TOOLS",
    "ERROR_KINDS",
    "PARSERS",
    "AssistantTurn",
    "EnvStep",
    "Environment",
    "OpenEnvEnvironment",
    "Parser",
    "ReasoningGymEnv",
    "Tool",
    "ToolCall",
    "ToolEnv",
    "ToolError",
    "ToolResult",
    "ToolRunner",
    "as_tool",
    "calculator",
    "parse_hermes",
    "parse_llama3_json",
    "parse_mistral",
    "parser_for",
    "python_tool",
    "reasoning_gym_reward",
    "reasoning_gym_rows",
    "resolve_tools",
    "tool_messages",
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxpt.envs' has no attribute {name!r}")
