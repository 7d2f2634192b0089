"""What every curation step shares: the step contract, its report, and the text of a row.

A step takes rows and returns the rows it keeps (in order) and the rows it removes, each with
a short reason. Rows are the dicts as read from the file, extra columns (``answer``, ``id``)
included: a step never copies or edits a row, so what survives is written out unchanged.

Row shapes (the ones ``jaxpt.data.sources`` validates):

    SFT         {"messages": [{"role", "content"}, ...]}  or  {"prompt", "completion"}
                (strings, or TRL-style message lists)
    preference  {"prompt", "chosen", "rejected"}
    prompt (RL) {"prompt", **columns}
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jaxpt.data.sources import (
    RowProblem,
    check_text,
    normalize_preference_row,
    normalize_prompt_row,
    normalize_sft_row,
    read_rows,
)

KINDS = ("sft", "preference", "prompt")
TEXT_FIELDS = ("row", "prompt", "response")
Removed = list[tuple[dict, str]]


class CurationStep:
    """One step of a curation pipeline.

    Subclasses set ``name`` (the config ``type``; a config may rename an instance) and
    implement ``__call__(rows) -> (kept, removed)``: ``kept`` in input order, ``removed`` as
    ``(row, reason)`` pairs. Any object with that attribute and call works as a step.
    """

    name: str = "step"

    def __call__(self, rows: list[dict]) -> tuple[list[dict], Removed]:
        raise NotImplementedError


class RowFilter(CurationStep):
    """A step that judges each row on its own: implement ``reject_reason``."""

    def reject_reason(self, row: dict) -> str | None:
        """Why ``row`` should go, or None to keep it."""
        raise NotImplementedError

    def __call__(self, rows: list[dict]) -> tuple[list[dict], Removed]:
        kept, removed = [], []
        for row in rows:
            reason = self.reject_reason(row)
            if reason is None:
                kept.append(row)
            else:
                removed.append((row, reason))
        return kept, removed


@dataclasses.dataclass
class StepReport:
    """What one step did: counts, removals grouped by reason, and a few removed rows.

    ``reasons`` groups removals by ``reason_kind`` (the reason with its numbers masked), so
    "reward math = 0 < 1" for a thousand rows is one entry. ``samples`` holds up to
    ``max_samples`` removed rows as ``{"index", "reason", "row"}``, where ``index`` is the
    row's number in the pipeline's input.
    """

    name: str
    rows_in: int
    rows_out: int
    removed: int
    reasons: dict[str, int]
    samples: list[dict]
    seconds: float = 0.0

    @classmethod
    def from_removed(
        cls,
        name: str,
        rows_in: int,
        removed: Removed,
        max_samples: int = 5,
        row_number: Callable[[dict], int | None] = lambda row: None,
        seconds: float = 0.0,
    ) -> StepReport:
        kinds = Counter(reason_kind(reason) for _, reason in removed)
        samples = [
            {"index": row_number(row), "reason": reason, "row": row}
            for row, reason in removed[:max_samples]
        ]
        return cls(
            name=name,
            rows_in=rows_in,
            rows_out=rows_in - len(removed),
            removed=len(removed),
            reasons=dict(kinds.most_common()),
            samples=samples,
            seconds=round(seconds, 3),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def reason_kind(reason: str) -> str:
    """The reason with its numbers replaced by N: what the report counts removals by."""
    return _NUMBER.sub("N", reason)[:200]


# ---------------------------------------------------------------------------- row text


def row_kind(row: dict) -> str:
    """``preference``, ``sft`` or ``prompt``, from the fields a row has."""
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "messages" in row or "completion" in row:
        return "sft"
    return "prompt"


def response_text(row: dict) -> str:
    """The assistant text of a row: its assistant turns joined, the completion, or, for a
    preference row, the chosen response."""
    if "messages" in row:
        return _turns_text(row["messages"], ("assistant",))
    if "chosen" in row:
        return _turns_text(row["chosen"], ("assistant",))
    return _turns_text(row.get("completion"), ("assistant",))


def prompt_text(row: dict) -> str:
    """The input side of a row: the non-assistant turns of ``messages`` joined, or
    ``prompt`` (a string, or every turn of a message list)."""
    if "messages" in row:
        return _turns_text(row["messages"], ("system", "user", "tool"))
    return _turns_text(row.get("prompt"), None)


def row_text(row: dict) -> str:
    """All conversation text of a row: prompt, response and (preference rows) rejected."""
    parts = [prompt_text(row), response_text(row)]
    if "rejected" in row:
        parts.append(_turns_text(row["rejected"], ("assistant",)))
    return "\n\n".join(part for part in parts if part)


def field_text(row: dict, field: str) -> str:
    """``row_text``, ``prompt_text`` or ``response_text`` by name (a step's ``fields``)."""
    return {"row": row_text, "prompt": prompt_text, "response": response_text}[field](row)


def check_field(field: str) -> str:
    """``field`` if it names a text field, else a ValueError listing them."""
    if field not in TEXT_FIELDS:
        raise ValueError(f"fields must be one of {TEXT_FIELDS}, got {field!r}")
    return field


def _turns_text(value: Any, roles: tuple[str, ...] | None) -> str:
    """A string as it is; a message list as the contents of its ``roles`` turns (None: all)
    joined by blank lines; anything else as empty."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        return ""
    contents = [
        message["content"]
        for message in value
        if isinstance(message, dict)
        and isinstance(message.get("content"), str)
        and (roles is None or message.get("role") in roles)
    ]
    return "\n\n".join(contents)


_WHITESPACE = re.compile(r"\s+")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def normalize_text(text: str) -> str:
    """NFKC, lowercase, whitespace runs collapsed to one space, stripped: what exact dedup
    hashes, so case, full-width forms and spacing do not make two rows differ."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def words(text: str) -> list[str]:
    """The normalised text as tokens: runs of letters/digits, and each other symbol alone.

    Symbols count as tokens so that "347+85" and "347-85" differ (they are different
    problems), which dropping punctuation, as n-gram decontamination often does, would hide.
    """
    return _TOKEN.findall(normalize_text(text))


# ------------------------------------------------------------------------- validation


def validate_row(row: Any, kind: str) -> None:
    """Raise RowProblem when ``row`` breaks the rules the training pipelines apply to
    ``kind`` rows (``jaxpt.data.sources``): its shape, clean text, distinct responses."""
    normalize = {
        "sft": normalize_sft_row,
        "preference": normalize_preference_row,
        "prompt": normalize_prompt_row,
    }[kind]
    normalized = normalize(row)
    # The normalised row holds exactly the fields training reads (every column of a
    # prompt row, which go to reward functions).
    check_text(normalized)
    if kind == "preference" and normalized["chosen"] == normalized["rejected"]:
        raise RowProblem("'chosen' and 'rejected' are identical: nothing to prefer")


def read_raw_rows(source: str | Path, split: str) -> Iterator[tuple[int, str, Any]]:
    """(row index, location hint, the row as read or a RowProblem) for a .jsonl/.json/.parquet
    file, dataset directory or hub name: the training pipelines' readers, without the
    normalisation that would drop extra columns."""
    # A private reader of jaxpt.data.sources on purpose: one reader for every row file, so
    # BOMs, odd line breaks and bad JSON are handled (and reported) alike everywhere.
    return read_rows(str(source), split)
