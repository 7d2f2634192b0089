"""Environments of multi-turn episodes: the protocol (``base``), tools and tool-call
parsing, and adapters for OpenEnv servers and reasoning-gym tasks."""

from jaxpt.envs.base import AssistantTurn, Environment, EnvStep, ToolCall
from jaxpt.envs.parsers import (
    PARSERS,
    Parser,
    parse_hermes,
    parse_llama3_json,
    parse_mistral,
    parser_for,
)
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

__all__ = [
    "BUILTIN_TOOLS",
    "ERROR_KINDS",
    "PARSERS",
    "AssistantTurn",
    "EnvStep",
    "Environment",
    "Parser",
    "Tool",
    "ToolCall",
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
    "resolve_tools",
    "tool_messages",
]
