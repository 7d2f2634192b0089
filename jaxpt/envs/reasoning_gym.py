"""``ReasoningGymEnv``: an episode over one reasoning-gym problem, scored by the task's checker.

Rows come from ``jaxpt.data.reasoning_gym.reasoning_gym_rows`` (``data.train:
reasoning_gym``). By default an episode is one reply, scored and done. With
``max_attempts`` > 1 a reply that is not fully right gets a user message asking for another
try, until the answer is right or the attempts run out; the episode's reward is the score of
its last reply. With ``tools`` the policy may call them first: a turn with tool calls goes to
``run_tools``, whose results continue the episode without using an attempt.
"""

from __future__ import annotations

from jaxpt.envs.base import AssistantTurn, Environment, EnvStep
from jaxpt.rewards.reasoning_gym import ANSWER_TAG, score_reply

RETRY_MESSAGE = "That is not correct, try again."


class ReasoningGymEnv(Environment):
    """One reasoning-gym problem per episode (see the module docstring).

    ``max_attempts``: replies scored before the episode ends (1: single turn);
    ``retry_message``: the user turn after a wrong reply; ``tools``: ``jaxpt.envs.Tool``
    objects or specs offered to the policy, run by ``runner`` (a shared
    ``jaxpt.envs.ToolRunner``; else one of its own); ``answer_tag``: the tag the answer is read from (None:
    the whole reply).
    """

    def __init__(
        self,
        *,
        max_attempts: int = 1,
        retry_message: str = RETRY_MESSAGE,
        tools: list | None = None,
        runner=None,
        answer_tag: str | None = ANSWER_TAG,
    ):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = max_attempts
        self.retry_message = retry_message
        from jaxpt.envs.tools import ToolRunner, resolve_tools

        self.tools = resolve_tools(list(tools or []))
        self.runner = runner or (ToolRunner(self.tools) if self.tools else None)
        self.answer_tag = answer_tag
        self.row: dict | None = None
        self.attempts = 0

    def reset(self, row: dict, seed: int) -> list[dict]:
        missing = [key for key in ("prompt", "task", "entry") if key not in row]
        if missing:
            raise ValueError(f"ReasoningGymEnv needs rows of jaxpt.data.reasoning_gym "
                             f"(missing {missing}); use data.train: reasoning_gym")
        self.row, self.attempts = row, 0
        prompt = row["prompt"]
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def step(self, turn: AssistantTurn) -> EnvStep:
        if (turn.tool_calls or turn.parse_errors) and self.tools:
            messages, errors = self.run_tools(turn)
            if messages:  # no results (no runner): the turn is scored as an answer
                return EnvStep(messages, info={"tool_calls": _call_counts(turn),
                                               "tool_errors": errors})
        self.attempts += 1
        row = self.row
        score = score_reply(turn.content, row["task"], row["entry"], row.get("task_options"),
                            self.answer_tag)
        right = score >= 1.0
        metrics = {"attempts": float(self.attempts), "correct": float(right)}
        if right or self.attempts >= self.max_attempts:
            return EnvStep(reward=score, done=True, info={"metrics": metrics})
        retry = [{"role": "user", "content": self.retry_message}]
        return EnvStep(retry, reward=0.0, info={"metrics": metrics})

    def run_tools(self, turn: AssistantTurn) -> tuple[list[dict], int]:
        """The tool result messages of ``turn``'s calls (and unreadable calls) and how
        many of them are errors."""
        from jaxpt.envs.tools import tool_messages

        if self.runner is None:
            return [], 0
        results = self.runner.run(turn.tool_calls, turn.parse_errors)
        return (tool_messages(turn.tool_calls, results),
                sum(r.error is not None for r in results))


def _call_counts(turn: AssistantTurn) -> dict[str, int]:
    counts: dict[str, int] = {}
    for call in turn.tool_calls:
        counts[call.name] = counts.get(call.name, 0) + 1
    return counts
