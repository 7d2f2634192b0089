"""Reading the human-evaluation files: one JSON object per line, errors naming the line."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence


def json_objects(path: str, required: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for every non-blank line of ``path``, ``where`` being
    ``"<path>: line N"``; a line that is not a JSON object with the ``required`` keys is an
    error naming it."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise TypeError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(map(repr, missing))}")
            yield where, row
