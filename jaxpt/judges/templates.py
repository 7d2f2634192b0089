"""Judge prompt templates: plain Python ``str.format`` strings with named placeholders.

``str.format`` rather than jinja: no dependency, and a template is checked up front by
listing its placeholders (``string.Formatter().parse``). Values are substituted once and
never re-parsed, so braces inside questions or answers are safe; a literal brace in a
template itself is written doubled (``{{`` / ``}}``).

Placeholders:
  pairwise  {question} {answer_a} {answer_b}                  (all required)
  rubric    {question} {answer} {rubric}, optional {min_score} {max_score}
            ({rubric} is required unless the judge's rubric is None)

The defaults ask for a final line ``Verdict: A|B|tie`` or ``Score: <n>``; the parsers in
``pairwise.py`` and ``rubric.py`` read the last such line and tolerate messy output.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence

PAIRWISE_TEMPLATE = """\
You are an impartial judge. Compare the two answers to the question below and decide which \
one is better: more correct, more helpful and clearer. Do not let the order of the answers, \
their length or their style sway you.

[Question]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Explain your reasoning in a few sentences. Then end your reply with one final line that is \
exactly "Verdict: A" (answer A is better), "Verdict: B" (answer B is better) or \
"Verdict: tie" (they are equally good)."""

DEFAULT_RUBRIC = (
    "How correct, complete and helpful the answer is. The highest score means fully correct "
    "and clearly explained; the lowest means wrong, irrelevant or empty."
)

RUBRIC_TEMPLATE = """\
You are an impartial judge. Grade the answer to the question below against the rubric.

[Rubric]
{rubric}

[Question]
{question}

[Answer]
{answer}

Explain your reasoning in a few sentences. Then end your reply with one final line of the \
form "Score: N", where N is an integer from {min_score} to {max_score}."""

PAIRWISE_FIELDS = ("question", "answer_a", "answer_b")
RUBRIC_FIELDS = ("question", "answer")
RUBRIC_OPTIONAL_FIELDS = ("rubric", "min_score", "max_score")


class TemplateError(ValueError):
    """A judge template that is malformed, lacks a placeholder or has an unknown one."""


def placeholders(template: str) -> set[str]:
    """The named placeholders of a ``str.format`` template (``{a.b}`` counts as ``a``)."""
    if not isinstance(template, str):
        raise TemplateError(f"a template is a string, got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as error:
        raise TemplateError(
            f"malformed template ({error}); write literal braces as '{{{{' and '}}}}'"
        ) from None
    names = set()
    for field in fields:
        name = field.split(".", 1)[0].split("[", 1)[0]
        if not name or name.isdigit():
            raise TemplateError(
                f"template has a positional placeholder {{{field}}}; use named ones"
            )
        names.add(name)
    return names


def check_template(template: str, required: Sequence[str], optional: Iterable[str] = ()) -> str:
    """``template`` itself, after checking that it has every ``required`` placeholder and
    no placeholder outside ``required`` and ``optional``; a ``TemplateError`` names the
    first missing or unknown one."""
    names = placeholders(template)
    allowed = set(required) | set(optional)
    for name in required:
        if name not in names:
            raise TemplateError(
                f"template lacks the placeholder {{{name}}}; a judge template needs "
                + ", ".join(f"{{{n}}}" for n in required)
            )
    unknown = sorted(names - allowed)
    if unknown:
        raise TemplateError(
            f"template has an unknown placeholder {{{unknown[0]}}}; allowed: "
            + ", ".join(f"{{{n}}}" for n in sorted(allowed))
        )
    return template


def fill(template: str, values: Mapping[str, object]) -> str:
    """The template with its placeholders replaced (extra values are ignored)."""
    return template.format_map(dict(values))
