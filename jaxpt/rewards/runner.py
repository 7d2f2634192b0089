"""Score a batch of completions with several reward functions, surviving the ones that fail.

A reward function that fails on a few completions must not stop training: an exception, a
wrong number of scores or a non-numeric score is logged with the function's name and a
truncated repr of the input, counted, and turns the affected scores into NaN (abstain), which
count as 0 in the weighted total. A function that fails on more than ``max_error_frac`` of a
batch's completions is broken, not unlucky: that raises ``RewardError`` with its first
traceback, rather than training on zeros.
"""

import dataclasses
import logging
import math
import reprlib
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

_short = reprlib.Repr()
_short.maxstring = 160
_short.maxother = 160
_short.maxlist = 3
_short.maxdict = 4


class RewardError(RuntimeError):
    """A reward function failed on too large a share of a batch's completions."""


class RewardFn(NamedTuple):
    """A reward function with the name its metrics go under and its weight in the total."""

    name: str
    fn: Callable[..., Sequence[float | None]]
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """Scores for one batch of n completions.

    scores: name -> float32[n], NaN where the function abstained or failed.
    total: float32[n], the weighted sum of the scores with NaN counted as 0 (like TRL's nansum).
    counters: name -> counts of "calls", "errors", "item_errors", "wrong_length",
      "invalid_values", "abstained" in this batch.
    """

    scores: dict[str, np.ndarray]
    total: np.ndarray
    counters: dict[str, dict[str, int]]

    def take(self, rows: np.ndarray) -> "RewardBatch":
        """The scores of ``rows`` (indices); counters stay those of the whole batch."""
        return RewardBatch(
            scores={name: scores_n[rows] for name, scores_n in self.scores.items()},
            total=self.total[rows], counters=self.counters,
        )

    @staticmethod
    def concat(batches: Sequence["RewardBatch"]) -> "RewardBatch":
        """One batch holding the rows of ``batches`` in order, with their counters summed."""
        first = batches[0]
        return RewardBatch(
            scores={name: np.concatenate([b.scores[name] for b in batches])
                    for name in first.scores},
            total=np.concatenate([b.total for b in batches]),
            counters={name: {key: sum(b.counters[name][key] for b in batches)
                             for key in first.counters[name]}
                      for name in first.counters},
        )

    def metrics(self) -> dict[str, float]:
        """Flat scalars for a metrics writer: per-function mean and counters, total mean."""
        out: dict[str, float] = {"rewards/total/mean": _mean(self.total)}
        for name, scores_n in self.scores.items():
            out[f"rewards/{name}/mean"] = _mean(scores_n)
            for key, count in self.counters[name].items():
                if key != "calls":
                    out[f"rewards/{name}/{key}"] = float(count)
        return out


class RewardRunner:
    """Calls each reward function on a batch; see the module docstring for failure handling.

    With `retry_per_item` (the default), a function that raises on the batch is called again
    on each completion alone, so one bad completion costs only its own score. A function
    that fails (raises, returns the wrong number of scores or a non-numeric one) on more than
    `max_error_frac` of a batch's completions raises `RewardError` naming it, with its first
    traceback; None (the default) never raises: the RL tasks pass their
    ``max_reward_error_frac``. `totals` accumulates the counters over all batches.
    """

    def __init__(
        self,
        reward_fns: Sequence[RewardFn | tuple],
        *,
        retry_per_item: bool = True,
        max_error_frac: float | None = None,
    ):
        self.reward_fns = [RewardFn(*spec) for spec in reward_fns]
        names = [r.name for r in self.reward_fns]
        if len(set(names)) != len(names):
            raise ValueError(f"reward function names must be unique, got {names}")
        if max_error_frac is not None and not 0 <= max_error_frac <= 1:
            raise ValueError(f"max_error_frac must be in [0, 1] or None, got {max_error_frac}")
        self.retry_per_item = retry_per_item
        self.max_error_frac = max_error_frac
        self.totals: dict[str, Counter] = {name: Counter() for name in names}

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> RewardBatch:
        """Score `completions` (with their `prompts` and dataset `columns`, one entry each)."""
        n = len(completions)
        scores, counters = {}, {}
        for reward in self.reward_fns:
            count = Counter(calls=1)
            failures: list[str] = []  # what went wrong, first first
            scores[reward.name] = self._score(
                reward, prompts, completions, columns, n, count, failures
            )
            self._check_failures(reward, count, n, failures)
            count["abstained"] = int(np.isnan(scores[reward.name]).sum())
            counters[reward.name] = {k: count[k] for k in _COUNTER_KEYS}
            self.totals[reward.name].update(count)
        total = np.zeros(n, np.float32)
        for reward in self.reward_fns:
            total += reward.weight * np.nan_to_num(scores[reward.name], nan=0.0)
        return RewardBatch(scores=scores, total=total, counters=counters)

    def _check_failures(self, reward, count, n, failures) -> None:
        """Raise ``RewardError`` when ``reward`` failed on more than ``max_error_frac`` of
        the batch (a whole-batch failure with no per-item retry fails every item)."""
        failed = count["failed_items"]
        if self.max_error_frac is None or not n or failed <= self.max_error_frac * n:
            return
        raise RewardError(
            f"reward function {reward.name!r} failed on {failed} of {n} completions, more "
            f"than max_error_frac={self.max_error_frac}; its first failure:\n{failures[0]}"
        )

    def _score(self, reward, prompts, completions, columns, n, count, failures) -> np.ndarray:
        try:
            values = reward.fn(prompts=prompts, completions=completions, **columns)
        except Exception as exc:
            count["errors"] += 1
            logger.warning(
                "reward %r raised %s on a batch of %d (first completion %s)%s",
                reward.name,
                _short.repr(exc),
                n,
                _short.repr(completions[0]) if n else "-",
                "; retrying one completion at a time" if self.retry_per_item else "",
                exc_info=exc,
            )
            if not self.retry_per_item:
                count["failed_items"] += n
                failures.append(_traceback(exc))
                return np.full(n, np.nan, np.float32)
            return self._score_each(reward, prompts, completions, columns, n, count, failures)
        return self._to_array(reward, values, n, count, completions, failures)

    def _score_each(self, reward, prompts, completions, columns, n, count, failures):
        scores_n = np.full(n, np.nan, np.float32)
        for i in range(n):
            try:
                values = reward.fn(
                    prompts=_item(prompts, i, n),
                    completions=[completions[i]],
                    **{key: _item(column, i, n) for key, column in columns.items()},
                )
            except Exception as exc:  # noqa: BLE001 -- any failure only costs this score
                count["item_errors"] += 1
                count["failed_items"] += 1
                failures.append(_traceback(exc))
                logger.warning(
                    "reward %r raised %s on completion %d: %s",
                    reward.name,
                    _short.repr(exc),
                    i,
                    _short.repr(completions[i]),
                )
                continue
            scores_n[i] = self._to_array(
                reward, values, 1, count, completions[i : i + 1], failures
            )[0]
        return scores_n

    def _to_array(self, reward, values, n, count, completions, failures) -> np.ndarray:
        try:
            values = list(values)
        except TypeError:
            values = None
        if values is None or len(values) != n:
            count["wrong_length"] += 1
            got = "a non-sequence" if values is None else f"{len(values)} scores"
            logger.warning("reward %r returned %s for %d completions", reward.name, got, n)
            count["failed_items"] += n
            failures.append(f"returned {got} for {n} completions")
            return np.full(n, np.nan, np.float32)
        scores_n = np.full(n, np.nan, np.float32)
        for i, value in enumerate(values):
            if value is None:
                continue  # abstain
            score = _as_float(value)
            if score is not None:
                scores_n[i] = score  # NaN stays NaN: an abstain too
                continue
            count["invalid_values"] += 1
            count["failed_items"] += 1
            failures.append(
                f"returned {_short.repr(value)} for completion {_short.repr(completions[i])}"
            )
            logger.warning(
                "reward %r returned %s for completion %s",
                reward.name,
                _short.repr(value),
                _short.repr(completions[i]),
            )
        return scores_n


_COUNTER_KEYS = ("calls", "errors", "item_errors", "wrong_length", "invalid_values", "abstained")


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


def _item(column: Any, i: int, n: int) -> Any:
    """Row i of a per-completion column, as a one-element list; anything else as it is."""
    is_column = isinstance(column, Sequence | np.ndarray) and not isinstance(column, str | bytes)
    if is_column and len(column) == n:
        return [column[i]]
    return column


def _as_float(value: Any) -> float | None:
    """A finite float or NaN from a numeric score (bool, numpy or jax scalar); None otherwise."""
    if isinstance(value, str | bytes):
        return None  # float("1.0") would succeed, but a string score is a bug
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isinf(score) else score


def _mean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
