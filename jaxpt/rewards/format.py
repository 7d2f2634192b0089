"""Format reward: did the completion lay out its answer the way the task asks?"""

import re
from collections.abc import Sequence
from typing import Any

from jaxpt.rewards.text import completion_text

# Some reasoning, then a last line `#### <number>` (jaxpt's arithmetic task, GSM8K).
HASH_ANSWER_FORMAT = (
    r"(?s:\A\s*\S.*\n[ \t]*####[ \t]*[-+]?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?[ \t]*\.?\s*\Z)"
)
# A \boxed{...} anywhere, with up to two levels of nested braces inside.
BOXED_ANSWER_FORMAT = r"\\boxed\s*\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}"
DEFAULT_FORMAT = f"{HASH_ANSWER_FORMAT}|{BOXED_ANSWER_FORMAT}"


def format_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    pattern: str = DEFAULT_FORMAT,
    **kwargs: Any,
) -> list[float]:
    """1.0 for each completion in which `pattern` is found (`re.search`), else 0.0.

    The default accepts reasoning followed by a final `#### <number>` line, or a `\\boxed{}`
    answer. Anchor a custom pattern (`\\A`, `\\Z`) to demand a whole-completion layout.
    """
    compiled = re.compile(pattern)
    return [float(compiled.search(completion_text(c)) is not None) for c in completions]
