"""Turn what a reward function receives (plain or conversational) into text."""

from collections.abc import Mapping, Sequence
from typing import Any


def completion_text(completion: Any) -> str:
    """The text of one completion.

    A completion is either a string or, in the conversational format, a list of
    `{"role", "content"}` messages; then the text is the last assistant message's content (the
    last message's content if none is marked assistant). Content given as a list of parts
    (`[{"type": "text", "text": ...}]`) is joined.
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content"))
    if isinstance(completion, Sequence):
        messages = [m for m in completion if isinstance(m, Mapping)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        chosen = assistant or messages
        return _content_text(chosen[-1].get("content")) if chosen else ""
    return str(completion)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = [p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content]
        return "".join(p for p in parts if isinstance(p, str))
    return str(content)
