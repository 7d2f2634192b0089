"""Environments of multi-turn episodes: the protocol (``base``), tools and tool-call
parsing, and adapters for OpenEnv servers and reasoning-gym tasks."""

from jaxpt.envs.base import AssistantTurn, Environment, EnvStep, ToolCall

__all__ = ["AssistantTurn", "EnvStep", "Environment", "ToolCall"]
