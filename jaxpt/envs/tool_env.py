"""``ToolEnv``: a dataset row's prompt, answered by a policy that may call tools.

Each assistant turn's tool calls run (``jaxpt.envs.tools.ToolRunner``: limits, errors as
results) and their results come back as tool messages; a turn that calls no tool is the
final answer and ends the episode. The environment gives no reward of its own: the run's
reward functions score the final answer against the row (``grpo.rewards``), as they score
single-turn completions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from jaxpt.envs.base import AssistantTurn, Environment, EnvStep


class ToolEnv(Environment):
    """See the module docstring. ``tools`` are ``jaxpt.envs.Tool`` objects or specs
    (``calculator``, ``python``, ``pkg.mod:function``); ``runner`` a shared
    ``ToolRunner`` (else one of its own); ``system`` an optional system turn;
    ``max_tool_calls`` per episode, past which every call is an error result."""

    def __init__(self, tools: Sequence = (), *, runner=None, system: str | None = None,
                 timeout_s: float = 10.0, max_calls_per_turn: int = 8,
                 max_tool_calls: int = 64):
        from jaxpt.envs.tools import ToolRunner, resolve_tools

        self.tools = resolve_tools(list(tools))
        self.runner = runner or ToolRunner(self.tools, timeout_s=timeout_s,
                                           max_calls_per_turn=max_calls_per_turn)
        self.system, self.max_tool_calls = system, max_tool_calls
        self.calls_made = 0

    def reset(self, row: dict, seed: int) -> list[dict]:
        prompt = row["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.calls_made = 0
        return system + [dict(m) for m in messages]

    def step(self, turn: AssistantTurn) -> EnvStep:
        from jaxpt.envs.tools import ToolResult, tool_messages

        if not turn.tool_calls and not turn.parse_errors:
            return EnvStep(done=True)
        allowed = max(self.max_tool_calls - self.calls_made, 0)
        calls, over = turn.tool_calls[:allowed], turn.tool_calls[allowed:]
        self.calls_made += len(turn.tool_calls)
        results = self.runner.run(calls, turn.parse_errors)
        refused = [ToolResult(c.name, f"error: not run: this episode may call tools "
                              f"{self.max_tool_calls} times", "too_many_calls") for c in over]
        results = results[: len(calls)] + refused + results[len(calls):]
        errors = sum(r.error is not None for r in results)
        return EnvStep(tool_messages(list(calls) + list(over), results),
                       info={"tool_calls": dict(Counter(c.name for c in turn.tool_calls)),
                             "tool_errors": errors})
