"""Math answer checking: pull the final answer out of a completion and compare it to the gold one.

Plain numbers are compared exactly as rationals (`Fraction`, never float), so 10**40 + 1 and
10**40 differ and 6/8 equals 0.75. Anything else (LaTeX, expressions, sets) goes to math-verify,
the checker TRL uses.
"""

import logging
import re
import threading
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from jaxpt.rewards.text import completion_text

logger = logging.getLogger(__name__)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH_LINE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_ANSWER_PHRASE = re.compile(r"\banswer\b\**\s*(?:is\b\s*:?|:)[ \t*]*([^\n]+)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
# "#### Step 2" is a markdown heading, not an answer line.
_HEADING_WORD = re.compile(r"[A-Za-z]{2,}")

_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_DECIMAL = re.compile(r"\d+\.?\d*|\.\d+")
_SLASH_FRACTION = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\{(\d+)\}\{(\d+)\}")

# Python refuses int() of strings over 4300 digits, and nobody's answer is that long.
_MAX_NUMBER_CHARS = 1000
# math-verify has no timeout outside the main thread; long inputs are where sympy gets stuck.
_MAX_MATH_VERIFY_CHARS = 500
_MATH_VERIFY_TIMEOUT_S = 5


def extract_answer(text: str) -> str | None:
    """The final answer in `text`, or None when there is none.

    In priority order: the content of the last complete `\\boxed{...}` (nested braces
    balanced), the last `#### answer` line (not a markdown heading such as "#### Step 2"), the
    last "The answer is X" / "answer: X" phrase.
    """
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    hash_answers = [
        m.group(1)
        for m in _HASH_LINE.finditer(text)
        if m.group(1) and not _HEADING_WORD.match(m.group(1))
    ]
    if hash_answers:
        return hash_answers[-1]
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        return _clean_phrase(phrases[-1].group(1))
    return None


def normalize_number(text: str) -> Fraction | None:
    """`text` as an exact rational if it is a plain number, else None.

    Accepts surrounding whitespace and `$`, a leading `+`/`-`, a trailing period, comma
    thousands separators ("1,000"), decimals ("0.75"), fractions ("3/4", "\\frac{3}{4}").
    """
    s = text.strip().replace("\\$", "").replace("{,}", ",").replace("\\,", "").replace("−", "-")
    s = s.strip("$ \t\n").rstrip(".").strip()
    negative = s.startswith("-")
    if s[:1] in ("+", "-"):
        s = s[1:].lstrip()
    if not s or len(s) > _MAX_NUMBER_CHARS:
        return None
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):
        value = Fraction(s)
    elif match := _SLASH_FRACTION.fullmatch(s) or _LATEX_FRACTION.fullmatch(s):
        numerator, denominator = Fraction(match.group(1)), Fraction(match.group(2))
        if denominator == 0:
            return None
        value = numerator / denominator
    else:
        return None
    return -value if negative else value


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Whether the predicted answer equals the gold one.

    Two plain numbers are compared exactly (so 1/3 and 0.333333 differ); otherwise math-verify
    decides, with its signal-based timeout in the main thread and no timeout elsewhere (signals
    only work in the main thread), where the input length is capped instead.
    """
    if pred is None or gold is None:
        return False
    pred_number, gold_number = normalize_number(pred), normalize_number(gold)
    if pred_number is not None and gold_number is not None:
        return pred_number == gold_number
    return _math_verify_match(pred, gold)


def reference_answer(gold: Any) -> str | None:
    """The answer to compare against: extracted from a worked solution, else the text itself."""
    if gold is None:
        return None
    gold = str(gold)
    return extract_answer(gold) or gold.strip() or None


def math_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 when a completion's final answer matches `answer`, else 0.0 (also when none is found).

    `answer` is the dataset column: a bare answer or a worked solution ending in `#### x` or
    `\\boxed{x}`. A row whose answer is None gets None (abstain).
    """
    return _score_answers(completions, answer, extract_answer)


def _score_answers(completions, answer, extract) -> list[float | None]:
    """1.0/0.0 per completion: does ``extract(text)`` match the row's reference answer;
    None where the row has no answer."""
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer):
        gold_answer = reference_answer(gold)
        if gold_answer is None:
            scores.append(None)
            continue
        predicted = extract(completion_text(completion))
        scores.append(float(answers_match(predicted, gold_answer)))
    return scores


# A signed integer, decimal or a/b fraction, not glued to letters ("x2", "2nd").
_LAST_NUMBER = re.compile(r"(?<![\w.])[-−]?\d+(?:\.\d+)?(?:\s*/\s*\d+)?(?![\w])")


def last_number(text: str) -> str | None:
    """The last number in ``text`` ("12 - 9 = 3." gives "3", "It is -4" gives "-4"), or None.

    For prompts that ask for "just the number": replies such as "12 + 7 = 19" are read by
    their last number, so restating the question costs nothing and a wrong result is wrong.
    """
    if not text:
        return None
    matches = _LAST_NUMBER.findall(text[-_MAX_NUMBER_CHARS:])
    return matches[-1].replace(" ", "") if matches else None


def last_number_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 when the last number of a completion equals ``answer`` exactly (as a rational),
    else 0.0; None (abstain) for a row without an answer."""
    return _score_answers(completions, answer, last_number)


def accuracy(completions: Sequence[Any], answers: Sequence[Any]) -> float:
    """Fraction of completions whose final answer matches; for evaluation loops."""
    if not completions:
        return 0.0
    scores = math_reward([None] * len(completions), completions, answers)
    return sum(s or 0.0 for s in scores) / len(scores)


def _last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOXED.finditer(text))):
        content = _balanced_group(text, match.end())
        if content is not None:  # a truncated final \boxed{ is skipped
            return content
    return None


def _balanced_group(text: str, start: int) -> str | None:
    """Text from `start` up to the brace closing an already opened `{`, or None if unclosed."""
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped brace, \{ or \}, does not count
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _clean_phrase(answer: str) -> str | None:
    end = _SENTENCE_END.search(answer)  # "42. Hope this helps!" -> "42"
    if end:
        answer = answer[: end.start()]
    answer = answer.strip().strip("*").strip()
    for opening, closing in (("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(opening) and answer.endswith(closing):
            answer = answer[len(opening) : -len(closing)].strip()
    return answer or None


def _math_verify_match(pred: str, gold: str) -> bool:
    if max(len(pred), len(gold)) > _MAX_MATH_VERIFY_CHARS:
        return False
    from math_verify import parse, verify  # slow import (sympy): only when needed
    from math_verify.errors import TimeoutException

    in_main_thread = threading.current_thread() is threading.main_thread()
    timeout = _MATH_VERIFY_TIMEOUT_S if in_main_thread else None
    try:
        gold_parsed = parse(_as_math(gold), parsing_timeout=timeout)
        pred_parsed = parse(_as_math(pred), parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except (Exception, TimeoutException):
        logger.debug("math-verify failed on pred=%r gold=%r", pred[:100], gold[:100], exc_info=True)
        return False


def _as_math(answer: str) -> str:
    # math-verify finds LaTeX reliably only inside math delimiters.
    return "$" + answer.strip().strip("$") + "$"
