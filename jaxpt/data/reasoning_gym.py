"""Rows of reasoning-gym tasks: procedural reasoning problems as RL prompts and eval rows.

reasoning-gym (the ``reasoning-gym`` package, jaxpt's ``examples`` extra) generates problems
by name (``chain_sum``, ``basic_arithmetic``, ``word_sorting``, ... ~100 tasks) from a seed,
each with a reference answer and the metadata its own checker (``score_answer``) reads.
``reasoning_gym_rows`` turns them into prompt rows that carry what scoring needs, so the
``reasoning_gym`` reward (``jaxpt.rewards.reasoning_gym``), the ``reasoning_gym`` eval task
and ``jaxpt.envs.ReasoningGymEnv`` can score a reply without regenerating the problem.

Problem ``i`` of seed ``s`` is drawn from ``random.Random(s + i)``: seeds ``s`` and ``s + 1``
share all but one problem. Held-out rows therefore come from a seed range that does not
meet the training one (``seed_ranges_overlap``); ``HELD_OUT_SEED`` is the default start of
the held-out range of both the training data source and the eval task.
"""

from __future__ import annotations

import functools
import json
from typing import Any

# Appended to every question: reasoning-gym's checkers expect the bare answer, and the
# reward reads it from the last <answer> tag (``jaxpt.rewards.reasoning_gym``).
DEFAULT_INSTRUCTION = (
    "Think it through, then give only your final answer between <answer> and </answer> tags."
)
HELD_OUT_SEED = 1_000_000_000  # far above any training seed + size that jaxpt configs use
_RESERVED_OPTIONS = ("seed", "size")  # set by jaxpt, not by a task's options


def import_reasoning_gym():
    """The ``reasoning_gym`` module, or an ImportError saying how to install it."""
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError(
            "reasoning-gym tasks need the reasoning-gym package: pip install 'jaxpt[examples]' "
            "(or pip install reasoning-gym)"
        ) from error
    return reasoning_gym


def task_names() -> list[str]:
    """Every task the installed reasoning-gym can generate."""
    return sorted(import_reasoning_gym().factory.DATASETS)


def make_dataset(task: str, *, size: int, seed: int, options: dict | None = None):
    """reasoning-gym's dataset ``task`` of ``size`` problems from ``seed``, with the task's own
    ``options`` (e.g. ``{"min_terms": 2}``); a ValueError names a bad task or option."""
    rg = import_reasoning_gym()
    options = dict(options or {})
    reserved = sorted(set(options) & set(_RESERVED_OPTIONS))
    if reserved:
        raise ValueError(f"reasoning-gym task {task!r}: set {reserved} with jaxpt's own keys, "
                         "not among the task's options")
    if task not in task_names():
        raise ValueError(f"unknown reasoning-gym task {task!r}{_close(task, task_names())}")
    try:
        return rg.create_dataset(task, size=size, seed=seed, **options)
    except (TypeError, ValueError, AssertionError) as error:  # a bad option: named, not traced
        raise ValueError(f"reasoning-gym task {task!r} with options {options}: "
                         f"{error or type(error).__name__}") from None


@functools.lru_cache(maxsize=64)
def _checker(task: str, options_json: str):
    return make_dataset(task, size=1, seed=0, options=json.loads(options_json))


def task_checker(task: str, options: dict | None = None):
    """A dataset of ``task`` built with ``options``, kept per process: its ``score_answer``
    scores replies (some tasks' checkers read their options, e.g. a tolerance)."""
    return _checker(task, json.dumps(options or {}, sort_keys=True))


def json_safe(value: Any) -> Any:
    """``value`` as JSON data (tuples become lists; what JSON cannot hold, its text), so a
    row survives files, Arrow and processes."""
    return json.loads(json.dumps(value, default=str))


def reasoning_gym_rows(
    task: str,
    *,
    size: int,
    seed: int,
    options: dict | None = None,
    instruction: str | None = None,
    system: str | None = None,
) -> list[dict]:
    """``size`` problems of reasoning-gym's ``task`` drawn from ``seed``, as prompt rows::

        {"id", "prompt": [system?, user], "answer": str | None,
         "task": task, "task_options": options, "entry": {"question", "answer", "metadata"}}

    The user turn is the question followed by ``instruction`` (None: ``DEFAULT_INSTRUCTION``,
    which asks for the answer in ``<answer>`` tags; "": the question alone);
    ``entry`` is reasoning-gym's own problem record (as JSON data), which its checker reads.
    """
    if size < 1:
        raise ValueError(f"reasoning-gym rows: size must be >= 1, got {size}")
    options = json_safe(dict(options or {}))
    dataset = make_dataset(task, size=size, seed=seed, options=options)
    instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
    head = [] if system is None else [{"role": "system", "content": system}]
    rows = []
    for index in range(size):
        entry = json_safe(dataset[index])
        question = entry["question"] if not instruction else f"{entry['question']}\n\n{instruction}"
        answer = entry.get("answer")
        rows.append({
            "id": f"{task}-{seed}-{index}",
            "prompt": head + [{"role": "user", "content": question}],
            "answer": None if answer is None else str(answer),
            "task": task,
            "task_options": options,
            "entry": entry,
        })
    return rows


def seed_ranges_overlap(seed_a: int, size_a: int, seed_b: int, size_b: int) -> bool:
    """Whether rows of (``seed_a``, ``size_a``) and (``seed_b``, ``size_b``) share problems:
    problem ``i`` of seed ``s`` is the one drawn from ``s + i``."""
    return seed_a < seed_b + size_b and seed_b < seed_a + size_a


def _close(name: str, names: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else " (see reasoning_gym.factory.DATASETS)"
