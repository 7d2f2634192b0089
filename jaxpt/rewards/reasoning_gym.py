"""The ``reasoning_gym`` reward: a reasoning-gym task's own checker on the answer a reply gives.

Rows from ``jaxpt.data.reasoning_gym.reasoning_gym_rows`` carry the task's name
(``task``), its options (``task_options``) and the problem record (``entry``); the reply's
answer is the text of its last ``<answer>...</answer>`` tag (``answer_tag``; None: the whole
reply), scored by the task's ``score_answer``: 1.0 is right, some tasks give partial credit
in between. A row without ``task`` or ``entry`` (another dataset mixed in) abstains (None).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from jaxpt.data.reasoning_gym import task_checker
from jaxpt.rewards.text import completion_text

ANSWER_TAG = "answer"


def extract_tagged_answer(text: str, tag: str | None = ANSWER_TAG) -> str | None:
    """The stripped text inside the last ``<tag>...</tag>`` of ``text`` (None when there is
    none, e.g. the reply ran out of tokens); with ``tag`` None, the whole text stripped."""
    if tag is None:
        return text.strip()
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def score_reply(reply: str, task: str, entry: dict | str, task_options: dict | None = None,
                answer_tag: str | None = ANSWER_TAG) -> float:
    """The task's own score in [0, 1] of the answer in ``reply`` to the problem ``entry``."""
    if isinstance(entry, str):  # a row read back from a file that kept it as JSON text
        entry = json.loads(entry)
    answer = extract_tagged_answer(reply, answer_tag)
    if answer is None:
        return 0.0
    checker = task_checker(task, task_options)
    try:
        score = float(checker.score_answer(answer, entry))
    except Exception:  # noqa: BLE001 - a checker choking on a malformed answer: wrong, not broken
        return 0.0
    return min(max(score, 0.0), 1.0)


def reasoning_gym_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    task: Sequence[str | None] | None = None,
    entry: Sequence[dict | str | None] | None = None,
    task_options: Sequence[dict | None] | None = None,
    answer_tag: str | None = ANSWER_TAG,
    **_: Any,
) -> list[float | None]:
    """Each completion's score by its row's reasoning-gym checker (see the module doc);
    None for rows that are not reasoning-gym problems."""
    n = len(completions)
    tasks = task if task is not None else [None] * n
    entries = entry if entry is not None else [None] * n
    options = task_options if task_options is not None else [None] * n
    scores: list[float | None] = []
    for completion, name, record, opts in zip(completions, tasks, entries, options, strict=True):
        if name is None or record is None:
            scores.append(None)
            continue
        scores.append(score_reply(completion_text(completion), name, record, opts, answer_tag))
    return scores
