"""Model-vs-model win rate: both models answer the same prompts, a reward model or an LLM
judge picks the better answer per prompt, and ``jaxpt.evals.stats`` turns the outcomes
into a win rate, a length-controlled win rate and bootstrap CIs.

Outcomes are model A's scores (1 A better, 0.5 tie, 0 B better; an LLM judge whose two
orders half-disagree gives 0.75 or 0.25). Lengths for the length control are characters of
the decoded answers, so models with different tokenizers compare fairly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Reward-model scores closer than this are a tie (float32 noise on identical answers).
DEFAULT_TIE_TOLERANCE = 1e-4


@dataclasses.dataclass
class Responses:
    """One model's answers: decoded texts and their token counts."""

    texts: list[str]
    num_tokens: list[int]


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence,
    *,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    model_path: str | None = None,
) -> Responses:
    """Answers of ``model`` to ``prompts`` (texts or chat messages), sampled ``batch_size``
    at a time by a ``jaxpt.sampling.PromptSampler`` (the path every generation job shares),
    greedy unless ``temperature`` > 0; each stops at ``eos_token_id`` (default:
    ``jaxpt.data.eos_token_ids(tokenizer, model_path)``)."""
    from jaxpt.sampling import PromptSampler

    sampler = PromptSampler(
        tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
        model_path=model_path, eos_token_id=eos_token_id,
    )
    texts, num_tokens = [], []
    encoded = [sampler.encode(p) for p in prompts]
    for samples in sampler.sample_in_chunks(model, encoded, seed=seed, chunk_size=batch_size):
        texts += samples.texts
        num_tokens += samples.lengths
    return Responses(texts, num_tokens)


def reward_model_outcomes(
    reward_model, prompts: Sequence, texts_a: Sequence[str], texts_b: Sequence[str],
    *, tolerance: float = DEFAULT_TIE_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(outcomes, scores_a, scores_b)``: A wins when its reward is higher by more than
    ``tolerance``, B likewise, otherwise a tie."""
    scores = reward_model.score(list(prompts) * 2, list(texts_a) + list(texts_b))
    scores_a, scores_b = scores[: len(prompts)], scores[len(prompts) :]
    diff = scores_a.astype(np.float64) - scores_b
    outcomes = np.where(diff > tolerance, 1.0, np.where(diff < -tolerance, 0.0, 0.5))
    return outcomes, scores_a, scores_b


def judge_outcomes(judge, prompts: Sequence, texts_a: Sequence[str], texts_b: Sequence[str]):
    """``(outcomes, verdicts)`` from a ``jaxpt.judges.PairwiseJudge`` (both orders asked)."""
    verdicts = judge.judge(list(prompts), list(texts_a), list(texts_b))
    return np.array([v.score_a for v in verdicts], np.float64), verdicts
