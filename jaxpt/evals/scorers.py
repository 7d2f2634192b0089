"""Scorers: what an eval task checks a completion with, by name.

A scorer maps completions and their dataset rows to ``Scored`` records: the score (1.0 is
correct) and what was scored, which is also the sample's vote for maj@k. Built-ins:

  math             the final answer (``\\boxed{}``, ``#### x``, "the answer is x") against the
                   row's answer: numbers exactly, anything else by math-verify
                   (``jaxpt.rewards.math_reward``).
  exact_match      the text after the last ``####`` or "answer:" marker (else the whole
                   completion), normalized (case, spaces, surrounding quotes and final period),
                   equal to the normalized answer.
  multiple_choice  a letter A-E read from the completion ("the answer is (B)", "Answer: B", a
                   lone leading "B"), equal to the answer letter (or 0-based index).
  code             a program run against trusted tests in the sandbox
                   (``jaxpt.rewards.sandbox.run_tests``): HumanEval rows (``prompt``, ``test``,
                   ``entry_point``) run ``prompt + completion`` (or the prompt followed by the
                   completion's python code block, when it has one) and are judged by
                   ``check(entry_point)`` in a separate process the program cannot reach; rows
                   with a ``tests`` column use ``jaxpt.rewards.code_reward``. 1.0 only when
                   every test passes. Code has no vote (no maj@k).
  reasoning_gym    a reasoning-gym task's own checker (``score_answer``) on the reply's last
                   ``<answer>`` tag, for rows of ``jaxpt.data.reasoning_gym`` (``task``,
                   ``entry``); some tasks give partial credit below 1.0.
Any other name is looked up as a reward function (``jaxpt.rewards.resolve_reward_fn``, e.g.
``last_number`` or ``package.module:function``); a reward of 1.0 is correct and the vote is
the completion's final answer.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from jaxpt.rewards import code_reward, extract_answer, extract_code, math_reward
from jaxpt.rewards.reasoning_gym import extract_tagged_answer, reasoning_gym_reward
from jaxpt.rewards.sandbox import run_tests


@dataclasses.dataclass(frozen=True)
class Scored:
    score: float
    scored: str | None  # the extracted answer, or the program that ran (tests excluded)


@dataclasses.dataclass(frozen=True)
class Scorer:
    name: str
    score: Callable[[Sequence[str], Sequence[dict]], list[Scored]]  # (completions, rows)
    votes: bool = True  # whether ``scored`` is an answer to vote on (maj@k)
    needs_answer: bool = True  # rows must carry an answer


def _answers(rows: Sequence[dict]) -> list:
    return [row.get("answer") for row in rows]


def _math(completions, rows) -> list[Scored]:
    scores = math_reward([None] * len(completions), list(completions), _answers(rows))
    return [Scored(float(s or 0.0), extract_answer(c)) for s, c in zip(scores, completions)]


_SPACES = re.compile(r"\s+")
_MARKER = re.compile(r"(?:####|\banswer\s*(?:is)?\s*:?)", re.IGNORECASE)


def normalize_text(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes or final period."""
    text = _SPACES.sub(" ", str(text)).strip().lower()
    text = text.rstrip(".").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def final_text(completion: str) -> str:
    """What follows the last ``####`` / "answer:" marker, else the completion itself."""
    markers = list(_MARKER.finditer(completion))
    return completion[markers[-1].end() :] if markers else completion


def _exact_match(completions, rows) -> list[Scored]:
    out = []
    for completion, answer in zip(completions, _answers(rows)):
        got = normalize_text(final_text(completion))
        out.append(Scored(float(answer is not None and got == normalize_text(answer)), got or None))
    return out


_LETTERS = "ABCDE"
_CHOICE_PATTERNS = (
    re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?\**([A-E])\b", re.IGNORECASE),
    re.compile(r"\(([A-E])\)"),
    re.compile(r"^\s*\**([A-E])(?:[).:\s]|$)"),
)


def choice_letter(text: str) -> str | None:
    """The letter A-E a completion picks: the last "answer is X" / "answer: X", else the
    last "(X)", else a letter opening the reply; None when there is none."""
    for pattern in _CHOICE_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


def _answer_letter(answer) -> str | None:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(_LETTERS):
        return _LETTERS[answer]
    text = str(answer).strip().strip("()").upper() if answer is not None else ""
    return text if len(text) == 1 and text in _LETTERS else None


def _multiple_choice(completions, rows) -> list[Scored]:
    out = []
    for completion, answer in zip(completions, _answers(rows)):
        letter, gold = choice_letter(completion), _answer_letter(answer)
        out.append(Scored(float(letter is not None and letter == gold), letter))
    return out


CODE_TIMEOUT_S = 10.0


def humaneval_program(prompt: str, completion: str, entry_point: str) -> str:
    """The program scored for a HumanEval-style problem: the prompt followed by the
    completion's python code block when it has one (a rewritten full function replaces the
    prompt's stub, whose imports and helpers stay), else the prompt continued by the
    completion text."""
    code = extract_code(completion)
    if code is None:
        return prompt + completion
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return prompt.rstrip() + "\n\n\n" + code
    return prompt + code


def _code_one(completion: str, row: dict) -> Scored:
    if "entry_point" in row and "test" in row:
        program = humaneval_program(row["prompt"], completion, row["entry_point"])
        tests = [(False, row["test"]), (True, f"check({row['entry_point']})")]
        result = run_tests(program, tests, timeout_s=CODE_TIMEOUT_S)
        passed = bool(result.verdicts) and all(result.verdicts)
        return Scored(float(passed), program)
    if "tests" in row:
        program = extract_code(completion)
        if program is None:
            return Scored(0.0, None)
        fenced = f"```python\n{program}\n```"
        score = code_reward([None], [fenced], [row["tests"]], timeout_s=CODE_TIMEOUT_S,
                            partial_credit=False, max_workers=1)[0]
        return Scored(float(score or 0.0), program)
    raise ValueError(
        "the code scorer needs rows with 'prompt', 'test' and 'entry_point' (HumanEval) or "
        f"with 'tests'; this row has {sorted(row)}"
    )


def _code(completions, rows) -> list[Scored]:
    workers = max(1, min(8, os.cpu_count() or 1, len(completions)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_code_one, completions, rows))


def _reasoning_gym(completions, rows) -> list[Scored]:
    scores = reasoning_gym_reward(
        [None] * len(completions), list(completions), task=[r.get("task") for r in rows],
        entry=[r.get("entry") for r in rows], task_options=[r.get("task_options") for r in rows],
    )
    if any(score is None for score in scores):
        raise ValueError("the reasoning_gym scorer needs rows of jaxpt.data.reasoning_gym "
                         "(with 'task' and 'entry')")
    return [Scored(score, extract_tagged_answer(c)) for score, c in zip(scores, completions)]


def _reward_scorer(name: str) -> Scorer:
    from jaxpt.rewards import resolve_reward_fn

    reward = resolve_reward_fn(name)

    def score(completions, rows) -> list[Scored]:
        values = reward(prompts=[None] * len(completions), completions=list(completions),
                        answer=_answers(rows))
        return [Scored(float(v == 1.0), extract_answer(c)) for v, c in zip(values, completions)]

    return Scorer(name, score)


SCORERS: dict[str, Scorer] = {
    "math": Scorer("math", _math),
    "exact_match": Scorer("exact_match", _exact_match),
    "multiple_choice": Scorer("multiple_choice", _multiple_choice),
    "code": Scorer("code", _code, votes=False, needs_answer=False),
    "reasoning_gym": Scorer("reasoning_gym", _reasoning_gym, needs_answer=False),
}


def get_scorer(name: str) -> Scorer:
    """The built-in scorer ``name``, else a reward function of that name (see module doc);
    raises ``ValueError`` for a name that is neither."""
    if name in SCORERS:
        return SCORERS[name]
    try:
        return _reward_scorer(name)
    except (ValueError, ImportError, AttributeError, TypeError) as error:
        raise ValueError(
            f"unknown scorer {name!r} (built-in: {', '.join(SCORERS)}; or a reward "
            f"function): {error}"
        ) from None
