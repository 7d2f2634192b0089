"""A dense, verifiable reward for the shipped arithmetic task's worked solutions.

The final answer alone says nothing until every column is right. ``worked_steps_reward``
also scores each column line of a worked solution against the reference computed from the
problem itself (the ``problem`` column, trusted data), so a reply with three right columns
and one slip earns more than one with none, and lines that are true but about some other
sum earn nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from jaxpt.data.arithmetic import ANSWER_PREFIX, Problem, worked_solution
from jaxpt.rewards.text import completion_text

_PROBLEM = re.compile(r"\s*(\d{1,30})\s*([+-])\s*(\d{1,30})\s*")


def parse_problem(text: str) -> Problem | None:
    """``"347+85"`` as a Problem, or None when it is not one."""
    match = _PROBLEM.fullmatch(str(text))
    if match is None:
        return None
    return Problem(int(match.group(1)), int(match.group(3)), match.group(2))


def column_lines(text: str) -> list[str]:
    """The lines of a worked solution before its answer line, whitespace-trimmed."""
    body = text.split(ANSWER_PREFIX, 1)[0]
    return [line.strip() for line in body.strip().splitlines() if line.strip()]


def worked_steps_reward(
    prompts: Sequence[Any], completions: Sequence[Any], problem: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """The share of the reference's column lines that the completion writes, in order.

    Line ``i`` counts when it equals the reference's line ``i``; the share is over the longer
    of the two, so padding with extra lines lowers it. None (abstain) for a row whose
    ``problem`` column is missing or not "a+b" / "a-b".
    """
    if len(completions) != len(problem):
        raise ValueError(f"{len(completions)} completions but {len(problem)} problems")
    scores: list[float | None] = []
    for completion, spec in zip(completions, problem):
        parsed = parse_problem(spec) if spec is not None else None
        if parsed is None or (parsed.op == "-" and parsed.a < parsed.b):
            scores.append(None)
            continue
        expected = column_lines(worked_solution(parsed))
        written = column_lines(completion_text(completion))
        right = sum(w == e for w, e in zip(written, expected))
        scores.append(right / max(len(expected), len(written)))
    return scores
