"""Accuracy on verifiable tasks: greedy generation scored by a program (the math reward)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np


def verifiable_accuracy(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    num_examples: int = 3,
    eos_token_id: int | Sequence[int] | None = None,
    model_path: str | None = None,
    scorer=None,
) -> dict:
    """Greedy accuracy of ``model`` on rows with ``prompt`` and ``answer``.

    Answers are checked with ``jaxpt.rewards.math_reward`` (final ``#### x`` line,
    ``\\boxed{x}`` or an "answer is" phrase; numbers compared exactly, else math-verify).
    ``scorer`` replaces that check: any reward function (e.g. ``last_number_reward``), called
    with the rows' columns as keywords; a score of 1.0 counts as correct. Generation stops
    at ``eos_token_id`` (one id or several; default: ``jaxpt.data.eos_token_ids(tokenizer,
    model_path)``, the eos, the chat template's end of turn and the model dir's generation
    config). Prompts are sampled ``batch_size`` at a time by a ``jaxpt.sampling.PromptSampler``.
    ``jaxpt.evals.evaluate_task`` adds sampling, pass@k and maj@k over tasks described as
    data. Returns ``accuracy``, ``n``, the mean completion length and a few examples.
    """
    from jaxpt.rewards import math_reward
    from jaxpt.sampling import PromptSampler

    if not rows:
        raise ValueError("verifiable_accuracy needs at least one row")
    start = time.perf_counter()
    sampler = PromptSampler(tokenizer, max_new_tokens=max_new_tokens, model_path=model_path,
                            eos_token_id=eos_token_id)
    prompts = [sampler.encode(r["prompt"]) for r in rows]
    completions, lengths = [], []
    for samples in sampler.sample_in_chunks(model, prompts, chunk_size=batch_size):
        completions += samples.texts
        lengths += samples.lengths
    scorer = scorer or math_reward
    # By keyword, with every column, as reward functions are called in training: a scorer
    # reads more than `answer` (reasoning_gym: `task` and `entry`; worked_steps: `problem`).
    columns = {key: [r.get(key) for r in rows] for key in dict.fromkeys(k for r in rows for k in r)
               if key not in ("prompt", "completions")}
    scores = scorer(prompts=[r["prompt"] for r in rows], completions=completions, **columns)
    correct = np.array([s == 1.0 for s in scores], np.float64)
    return {
        "accuracy": float(correct.mean()),
        "n": len(rows),
        "mean_completion_tokens": float(np.mean(lengths)),
        "eval_s": round(time.perf_counter() - start, 3),
        "examples": [
            {"prompt": rows[i]["prompt"], "completion": completions[i], "answer": rows[i]["answer"]}
            for i in range(min(num_examples, len(rows)))
        ],
    }
