"""The environment protocol of multi-turn episodes.

An ``Environment`` runs one episode: ``reset(row, seed)`` gives the first messages (the
conversation the policy answers, from a dataset row) and ``tools`` the tools the policy may
call; ``step(turn)`` receives each assistant turn (its text and parsed tool calls) and
returns what comes next: tool results and/or user messages, a reward for the turn and
whether the episode is over. The episode runner (``jaxpt.tasks.rl.episodes``) tokenizes
what the environment returns with the model's chat template and keeps the policy's own
tokens exactly as sampled.

One instance serves one episode (many run at once), so an environment keeps its
episode's state on ``self``. Environments are plain Python classes: the package's own
(``jaxpt.envs.ToolEnv``, ``jaxpt.envs.OpenEnvEnvironment``, ``jaxpt.envs.ReasoningGymEnv``)
and a user's, by import path (``envs.spec: mypkg.mod:MyEnv``).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class ToolCall:
    """One call the policy asked for: a tool name and its JSON arguments; ``id`` as the
    template renders it (Mistral's 9-character ids), when the format has one."""

    name: str
    arguments: dict[str, Any]
    id: str | None = None


@dataclasses.dataclass
class AssistantTurn:
    """What the policy said in one turn: its decoded text (special tokens kept, as
    Mistral's ``[TOOL_CALLS]`` and Llama's ``<|python_tag|>`` are; its end-of-turn token
    dropped), the
    text outside tool calls (``content``), the calls parsed from it, and why any part of
    it could not be parsed (a malformed call: the episode goes on with an error result)."""

    text: str
    content: str
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    parse_errors: list[str] = dataclasses.field(default_factory=list)
    truncated: bool = False  # the turn ran out of tokens before it ended


@dataclasses.dataclass
class EnvStep:
    """An environment's answer to one assistant turn.

    ``messages`` are appended to the conversation (``{"role": "tool", "name": ...,
    "content": ...}`` results, ``{"role": "user", ...}`` follow-ups); ``reward`` is this
    turn's reward (an episode's return is the sum); ``done`` ends the episode; ``info``
    carries counts the runner reports as metrics (``tool_calls``: {name: count},
    ``tool_errors``: int, anything numeric under ``metrics``).
    """

    messages: list[dict] = dataclasses.field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    info: dict = dataclasses.field(default_factory=dict)


class Environment:
    """The base class of environments (see the module docstring).

    ``tools`` are ``jaxpt.envs.Tool`` objects: their JSON schemas go to the chat template
    (``apply_chat_template(tools=...)``). ``reset`` returns the first messages; ``step``
    must not raise on anything the policy wrote (a malformed or failing call becomes an
    error message in the result); ``close`` frees what ``reset`` took.
    """

    tools: tuple = ()

    def reset(self, row: dict, seed: int) -> list[dict]:
        raise NotImplementedError

    def step(self, turn: AssistantTurn) -> EnvStep:
        raise NotImplementedError

    def close(self) -> None:
        pass
