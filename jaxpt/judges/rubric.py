"""Rubric LLM judge: an integer score for one answer against a rubric, and its use as a
reward function.

A reply's score is the last ``Score: N`` in it (or a reply that is only a number). A score
outside [min_score, max_score] is None, not clamped: a judge that answers "Score: 85" on a
1-10 scale did not follow the format (a percentage, a typo), and clamping would turn that
misreading into the top score. Unparsed and out-of-range replies are None; a reward
function abstains on None (``jaxpt.rewards``: NaN, left out of the weighted total).

``RubricJudge.reward_fn`` has TRL's reward-function signature and returns scores mapped to
[0, 1]; ``rubric_reward`` is the same as a module-level function for configs:

    rewards:
      - fn: jaxpt.judges:rubric_reward
        kwargs: {model: path/to/judge, rubric: "Is the answer polite?", max_score: 5}
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from jaxpt.judges.generator import (
    Generator,
    make_generator,
    question_text,
    run_batched,
)
from jaxpt.judges.templates import (
    DEFAULT_RUBRIC,
    RUBRIC_FIELDS,
    RUBRIC_OPTIONAL_FIELDS,
    RUBRIC_TEMPLATE,
    TemplateError,
    check_template,
    fill,
    placeholders,
)
from jaxpt.rewards.text import completion_text

_NUMBER = r"([-+]?\d+(?:\.\d+)?)"
_SCORE_RE = re.compile(r"score[\s*_]*(?:[:=\-]|is)?[\s*_\"'\[(]*" + _NUMBER, re.IGNORECASE)
_BARE_RE = re.compile(r"^[\s*_\"'\[(]*" + _NUMBER + r"(?:\s*/\s*\d+)?[\s*_\"'\]).!]*$")


def parse_score(text: str) -> float | None:
    """The number of the last ``Score: N`` in a reply (``**Score:** 7``, ``score=7/10``,
    ``Final score is 8.`` all read), or of a reply that is only a number; else None."""
    matches = _SCORE_RE.findall(text or "")
    if matches:
        return float(matches[-1])
    bare = _BARE_RE.match((text or "").strip())
    return float(bare.group(1)) if bare else None


@dataclasses.dataclass(frozen=True)
class RubricScore:
    """One judged answer: the judge's reply, the parsed number (even out of range), the
    score (None when unparsed or out of range) and the score mapped to [0, 1]."""

    raw: str
    parsed: float | None
    score: float | None
    normalized: float | None


class RubricJudge:
    """Score answers against a rubric with an LLM judge.

    ``template`` is a ``str.format`` string with {question} and {answer}, {rubric} (needed
    unless ``rubric`` is None) and optionally {min_score}, {max_score} (default
    ``RUBRIC_TEMPLATE``). A dataset column named ``rubric_column`` (default "rubric"), when
    present, gives each row its own rubric in ``reward_fn``. Other arguments as in
    ``PairwiseJudge``: ``model`` a loaded jaxpt model (with its tokenizer) or a path loaded
    on first use, greedy by default, ``batch_size`` prompts per generate call, ``generator``
    a replacement for the model.
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        template: str | None = None,
        rubric: str | None = DEFAULT_RUBRIC,
        min_score: int = 1,
        max_score: int = 10,
        *,
        rubric_column: str | None = "rubric",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        batch_size: int = 64,
        eos_token_id: int | Sequence[int] | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        load_kwargs: Mapping | None = None,
        generator: Generator | None = None,
    ):
        template = template or RUBRIC_TEMPLATE
        required = RUBRIC_FIELDS + (("rubric",) if rubric is not None else ())
        self.template = check_template(template, required, RUBRIC_OPTIONAL_FIELDS)
        if rubric is None and "rubric" in placeholders(template):
            raise TemplateError("template has a {rubric} placeholder but rubric is None")
        if not min_score < max_score:
            raise ValueError(f"need min_score < max_score, got {min_score} and {max_score}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.rubric = rubric
        self.min_score, self.max_score = min_score, max_score
        self.rubric_column = rubric_column
        self.batch_size = batch_size
        self.generator = make_generator(
            model,
            tokenizer,
            generator,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            eos_token_id=eos_token_id,
            chat_template=chat_template,
            system_prompt=system_prompt,
            load_kwargs=load_kwargs,
        )

    def render(self, prompt, response, rubric: str | None = None) -> str:
        """The judge prompt for one answer (``rubric`` overrides the judge's)."""
        return fill(
            self.template,
            {
                "question": question_text(prompt),
                "answer": completion_text(response),
                "rubric": self.rubric if rubric is None else rubric,
                "min_score": self.min_score,
                "max_score": self.max_score,
            },
        )

    def to_score(self, raw: str) -> RubricScore:
        """A reply parsed, range-checked and normalized."""
        parsed = parse_score(raw)
        if parsed is None or not self.min_score <= parsed <= self.max_score:
            return RubricScore(raw, parsed, None, None)
        normalized = (parsed - self.min_score) / (self.max_score - self.min_score)
        return RubricScore(raw, parsed, parsed, normalized)

    def judge(
        self, prompts: Sequence, responses: Sequence, rubrics: Sequence | None = None
    ) -> list[RubricScore]:
        """A ``RubricScore`` per (prompt, response); ``rubrics`` optionally one per row."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        if rubrics is not None and len(rubrics) != len(prompts):
            raise ValueError(f"got {len(rubrics)} rubrics for {len(prompts)} prompts")
        rubrics = rubrics if rubrics is not None else [None] * len(prompts)
        texts = [self.render(p, r, k) for p, r, k in zip(prompts, responses, rubrics)]
        replies = run_batched(self.generator, texts, self.batch_size)
        return [self.to_score(reply) for reply in replies]

    def score(
        self, prompts: Sequence, responses: Sequence, rubrics: Sequence | None = None
    ) -> list[float | None]:
        """Scores in [min_score, max_score], None where the reply had no valid score."""
        return [s.score for s in self.judge(prompts, responses, rubrics)]

    def reward_fn(self, prompts, completions, **columns) -> list[float | None]:
        """TRL's reward-function signature: scores normalized to [0, 1], None to abstain."""
        rubrics = columns.get(self.rubric_column) if self.rubric_column else None
        return [s.normalized for s in self.judge(prompts, completions, rubrics)]

    __call__ = reward_fn


_JUDGES: dict[tuple, RubricJudge] = {}


def rubric_reward(
    prompts,
    completions,
    *,
    model: str,
    tokenizer: str | None = None,
    template: str | None = None,
    rubric: str | None = DEFAULT_RUBRIC,
    min_score: int = 1,
    max_score: int = 10,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    chat_template: bool = True,
    system_prompt: str | None = None,
    dtype: str = "float32",
    **columns,
) -> list[float | None]:
    """A rubric judge as a reward function for configs (``jaxpt.judges:rubric_reward`` with
    ``kwargs: {model: <path>, ...}``). The judge is built and its model loaded on the first
    call, then cached per settings for the life of the process. Returns [0, 1] scores.

    Its keyword arguments share a namespace with the dataset columns (the reward runner
    passes columns as keywords), so a dataset must not have columns with their names
    (``model``, ``rubric`` ...); per-row rubrics come from a "judge_rubric" column.
    """
    settings = {
        "template": template,
        "rubric": rubric,
        "min_score": min_score,
        "max_score": max_score,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "chat_template": chat_template,
        "system_prompt": system_prompt,
    }
    key = (model, tokenizer, dtype, tuple(settings.items()))
    if key not in _JUDGES:
        _JUDGES[key] = RubricJudge(
            model,
            tokenizer,
            rubric_column="judge_rubric",
            load_kwargs={"dtype": dtype},
            **settings,
        )
    judge = _JUDGES[key]
    return judge.reward_fn(prompts, completions, **columns)
