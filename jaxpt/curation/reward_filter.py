"""The verifiable filter: score each row's response with jaxpt reward functions and drop the
rows that score below a minimum (e.g. SFT solutions whose final answer is not the row's
``answer``)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from jaxpt.config import ConfigError
from jaxpt.curation.base import CurationStep, Removed

# Fields that hold the conversation; every other column goes to the reward functions.
_CONVERSATION_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")


class RewardFnFilter(CurationStep):
    """Rows whose response scores below ``min_score`` on any of ``rewards``.

    ``rewards`` takes the specs of ``grpo.rewards`` (``[{name: math}, {name: format,
    kwargs: {...}}]``, or import paths). Each function is called as TRL calls it,
    ``f(prompts=..., completions=..., **columns)``, with the row's other columns (``answer``,
    ``tests``, ...). The response scored is the last assistant turn of ``messages``, the
    ``completion``, or a preference row's ``chosen``. ``min_score`` is one number for every
    function or a mapping from each function's name to its own. A row a function abstains
    on (or fails on) is removed unless ``keep_abstained``.
    """

    name = "reward_fn"

    def __init__(self, rewards: Sequence[Any] | Mapping[str, Any] = ({"name": "math"},),
                 min_score: float | Mapping[str, float] = 1.0, keep_abstained: bool = False,
                 batch_size: int = 64):
        from jaxpt.rewards import RewardRunner, build_reward_fns

        try:
            specs = rewards if isinstance(rewards, Mapping) else list(rewards)
            reward_fns = build_reward_fns(specs)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"rewards: {error}") from None
        if not reward_fns:
            raise ValueError("rewards must name at least one reward function, e.g. [{name: math}]")
        self.runner = RewardRunner(reward_fns)
        names = [reward.name for reward in reward_fns]
        if isinstance(min_score, Mapping):
            missing = sorted(set(names) - set(min_score))
            unknown = sorted(set(min_score) - set(names))
            if missing or unknown:
                raise ValueError(
                    f"min_score must give each reward ({', '.join(names)}) a minimum; "
                    f"missing {missing}, unknown {unknown}"
                )
            self.min_score = {name: float(min_score[name]) for name in names}
        else:
            self.min_score = dict.fromkeys(names, float(min_score))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.keep_abstained, self.batch_size = keep_abstained, batch_size
        self.required = {r.name: _required_columns(r.fn) for r in reward_fns}

    def __call__(self, rows: list[dict]) -> tuple[list[dict], Removed]:
        kept, removed = [], []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            for row, reason in zip(batch, self._reasons(batch)):
                if reason is None:
                    kept.append(row)
                else:
                    removed.append((row, reason))
        return kept, removed

    def _reasons(self, batch: list[dict]) -> list[str | None]:
        keys = {key for row in batch for key in row if key not in _CONVERSATION_FIELDS}
        for name, required in self.required.items():
            absent = sorted(required - keys)
            if absent:  # not one row can be scored: a config mistake, not bad rows
                raise ConfigError(
                    f"reward_fn: reward {name!r} needs the column(s) {absent}, which the rows "
                    f"lack (columns: {sorted(keys) or 'none'})"
                )
        columns = {key: [row.get(key) for row in batch] for key in sorted(keys)}
        scores = self.runner(
            [_prompt(row) for row in batch], [_completion(row) for row in batch], **columns
        ).scores
        reasons = []
        for i in range(len(batch)):
            reasons.append(self._reason({name: float(s[i]) for name, s in scores.items()}))
        return reasons

    def _reason(self, scores: dict[str, float]) -> str | None:
        for name, score in scores.items():
            minimum = self.min_score[name]
            if math.isnan(score):
                if not self.keep_abstained:
                    return f"reward {name} gave no score (abstained or failed)"
            elif score < minimum:
                return f"reward {name} = {score:g} < {minimum:g}"
        return None


def _prompt(row: dict) -> Any:
    """The prompt as TRL passes it: the ``prompt`` field, or the turns before the last
    assistant turn of ``messages``."""
    if "prompt" in row:
        return row["prompt"]
    messages = row.get("messages") or []
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=0)
    return messages[:last]


def _completion(row: dict) -> str:
    from jaxpt.rewards import completion_text

    for field in ("messages", "completion", "chosen"):
        if field in row:
            return completion_text(row[field])
    return ""


def _required_columns(fn: Any) -> set[str]:
    """The dataset columns ``fn`` cannot be called without (e.g. ``answer`` for math)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        p.name for p in parameters
        if p.kind in plain and p.default is inspect.Parameter.empty
        and p.name not in ("prompts", "completions")
    }
