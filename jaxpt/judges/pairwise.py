"""Pairwise LLM judge: which of two answers is better, asked in both orders.

Every pair is rendered twice, (A=a, B=b) and (A=b, B=a), and both go into the same batched
``jaxpt.sampling.PromptSampler`` call. The swapped reply is mapped back to the original answers
and the two votes are combined:

  both say X (a, b or tie)    -> X                      score_a 1 / 0 / 0.5
  one says tie, the other X   -> X at half weight       score_a 0.75 (a) or 0.25 (b)
  a against b (position bias) -> tie                    score_a 0.5

An unparseable reply is no verdict and counts as a tie vote (flagged in ``unparsed_*``).
``consistent`` is True only when both replies parsed and name the same answer (or both tie).

This module also holds ``ModelGenerator``, the text-in, text-out batched generator both
judges share, and ``question_text``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

from jaxpt.judges.generator import Generator, make_generator, question_text, run_batched
from jaxpt.judges.templates import PAIRWISE_FIELDS, PAIRWISE_TEMPLATE, check_template, fill
from jaxpt.rewards.text import completion_text

_OPEN = r"[\s*_\"'\[(]*"  # markdown bold, quotes and brackets around a label
_LABEL = r"(?:(?:answer|response|assistant)\s+)?(a\s+tie|tie|a|b)(?![a-z0-9])"
_VERDICT_RE = re.compile(r"verdict[\s*_]*(?:[:=\-]|is)?" + _OPEN + _LABEL, re.IGNORECASE)
_BARE_RE = re.compile(r"^" + _OPEN + _LABEL + r"[\s*_\"'\]).!]*$", re.IGNORECASE)

_SCORE_OF = {"a": 1.0, "b": 0.0, "tie": 0.5}
_HALF_SCORE_OF = {"a": 0.75, "b": 0.25}
_SWAP = {"A": "b", "B": "a", "tie": "tie"}
_SAME = {"A": "a", "B": "b", "tie": "tie"}


def parse_verdict(text: str) -> str | None:
    """The verdict in a judge reply: "A", "B" or "tie", or None when there is none.

    The last ``Verdict: X`` in the text wins (case-insensitive; markdown, quotes, brackets,
    "Answer X" and trailing punctuation allowed; "a tie" is a tie). A reply that is only a
    label ("B", "[[A]]", "Tie.") also counts.
    """
    matches = _VERDICT_RE.findall(text or "")
    label = matches[-1] if matches else None
    if label is None:
        bare = _BARE_RE.match((text or "").strip())
        label = bare.group(1) if bare else None
    if label is None:
        return None
    label = label.lower()
    return "tie" if label.endswith("tie") else label.upper()


@dataclasses.dataclass(frozen=True)
class PairwiseVerdict:
    """The judgement of one pair. ``*_ab`` is the order (A=a, B=b), ``*_ba`` the swapped one.

    ``parsed_*`` are labels as the judge wrote them ("A"/"B"/"tie", None = unparsed), in
    that order's positions; ``vote_*`` the same mapped to the original answers.
    """

    raw_ab: str
    raw_ba: str
    parsed_ab: str | None
    parsed_ba: str | None
    winner: str  # "a" | "b" | "tie"
    score_a: float  # 1 a wins, 0.5 tie, 0 b wins (0.75 / 0.25: one order tied)
    consistent: bool
    unparsed_ab: bool
    unparsed_ba: bool

    @property
    def vote_ab(self) -> str | None:
        return None if self.parsed_ab is None else _SAME[self.parsed_ab]

    @property
    def vote_ba(self) -> str | None:
        return None if self.parsed_ba is None else _SWAP[self.parsed_ba]


def combine(raw_ab: str, raw_ba: str) -> PairwiseVerdict:
    """The verdict of a pair from the replies in both orders (rule in the module docstring)."""
    parsed_ab, parsed_ba = parse_verdict(raw_ab), parse_verdict(raw_ba)
    vote_ab = _SAME[parsed_ab] if parsed_ab else "tie"
    vote_ba = _SWAP[parsed_ba] if parsed_ba else "tie"
    if vote_ab == vote_ba:
        winner, score_a = vote_ab, _SCORE_OF[vote_ab]
    elif "tie" in (vote_ab, vote_ba):
        winner = vote_ab if vote_ba == "tie" else vote_ba
        score_a = _HALF_SCORE_OF[winner]
    else:
        winner, score_a = "tie", 0.5
    consistent = parsed_ab is not None and parsed_ba is not None and vote_ab == vote_ba
    return PairwiseVerdict(
        raw_ab,
        raw_ba,
        parsed_ab,
        parsed_ba,
        winner,
        score_a,
        consistent,
        unparsed_ab=parsed_ab is None,
        unparsed_ba=parsed_ba is None,
    )


def agreement(verdicts: Sequence[PairwiseVerdict]) -> float:
    """Share of pairs whose two orders parsed and agree (NaN for no pairs)."""
    if not verdicts:
        return math.nan
    return sum(v.consistent for v in verdicts) / len(verdicts)


def position_bias(verdicts: Sequence[PairwiseVerdict]) -> float:
    """Share of decisive single-order verdicts that chose the first position ("A").

    Over both orders of every pair; ties and unparsed replies are left out, so 0.5 means no
    position preference whatever the tie rate, 1.0 a judge that always says "A" (NaN when
    no reply was decisive).
    """
    labels = [p for v in verdicts for p in (v.parsed_ab, v.parsed_ba) if p in ("A", "B")]
    if not labels:
        return math.nan
    return labels.count("A") / len(labels)


def summarize(verdicts: Sequence[PairwiseVerdict]) -> dict[str, float]:
    """Counts and rates of a list of verdicts: mean ``score_a`` (a's win rate, ties half),
    wins, ties, agreement, position bias and unparsed replies."""
    n = len(verdicts)
    return {
        "n": n,
        "win_rate_a": sum(v.score_a for v in verdicts) / n if n else math.nan,
        "wins_a": sum(v.winner == "a" for v in verdicts),
        "wins_b": sum(v.winner == "b" for v in verdicts),
        "ties": sum(v.winner == "tie" for v in verdicts),
        "agreement": agreement(verdicts),
        "position_bias": position_bias(verdicts),
        "unparsed": sum(v.unparsed_ab + v.unparsed_ba for v in verdicts),
    }


class PairwiseJudge:
    """Judge which of two responses to a prompt is better, in both orders (module docstring).

    ``template`` is a ``str.format`` string with {question}, {answer_a}, {answer_b} (default
    ``PAIRWISE_TEMPLATE``). Generation is greedy by default; ``batch_size`` is the number of
    judge prompts per generate call (both orders of a pair always share a call).
    ``generator`` replaces the model: any callable mapping a list of prompt texts to a list
    of replies.
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        template: str | None = None,
        *,
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
        self.template = check_template(template or PAIRWISE_TEMPLATE, PAIRWISE_FIELDS)
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (both orders), got {batch_size}")
        self.batch_size = batch_size - batch_size % 2
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

    def render(self, prompt, first, second) -> str:
        """The judge prompt showing ``first`` as answer A and ``second`` as answer B."""
        return fill(
            self.template,
            {
                "question": question_text(prompt),
                "answer_a": completion_text(first),
                "answer_b": completion_text(second),
            },
        )

    def judge(
        self, prompts: Sequence, responses_a: Sequence, responses_b: Sequence
    ) -> list[PairwiseVerdict]:
        """One ``PairwiseVerdict`` per (prompt, response a, response b)."""
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError(
                f"got {len(prompts)} prompts, {len(responses_a)} responses_a and "
                f"{len(responses_b)} responses_b"
            )
        texts = []
        for prompt, a, b in zip(prompts, responses_a, responses_b):
            texts += [self.render(prompt, a, b), self.render(prompt, b, a)]
        replies = run_batched(self.generator, texts, self.batch_size)
        return [combine(replies[i], replies[i + 1]) for i in range(0, len(replies), 2)]

    __call__ = judge
