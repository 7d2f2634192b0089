"""Metrics over several samples per problem: pass@k, maj@k, mean@k and best@k (reranking).

Each problem contributes a list of per-sample scores (1.0 = correct) in sampling order and,
for maj@k, the answer extracted from each sample (None where none could be read). Every
metric is the mean over problems of a per-problem value.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct.

    ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021, "Evaluating Large Language Models
    Trained on Code"): the chance that ``k`` samples drawn without replacement from the
    ``n`` include a correct one. The ratio is computed as the product
    ``prod_{i = n - c + 1}^{n} (1 - k / i)``, which never forms the large binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def majority_answer(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote among ``answers``, or None when no
    sample has an answer.

    Samples without an answer (None) do not vote. Ties go to the answer that appeared
    first, so the result depends only on the order the samples were drawn in.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first.setdefault(answer, index)
    if not counts:
        return None
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return first[best]


def maj_at_k(answers: Sequence[str | None], scores: Sequence[float], k: int) -> float:
    """1.0 when the majority answer among the first ``k`` samples is correct, else 0.0.

    The winner is chosen by ``majority_answer`` (unanswered samples abstain; ties go to
    the answer seen first); it is correct when the first sample giving it scored 1.0.
    No answer at all scores 0.0.
    """
    _check_k(len(scores), k)
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answers but {len(scores)} scores")
    winner = majority_answer(answers[:k])
    return 0.0 if winner is None else float(scores[winner] >= 1.0)


def best_at_k(scores: Sequence[float], ranks: Sequence[float], k: int) -> float:
    """1.0 when the sample that ``ranks`` (a reranker's scores) puts highest among the first
    ``k`` is correct (the first on ties), else 0.0."""
    _check_k(len(scores), k)
    if len(ranks) != len(scores):
        raise ValueError(f"{len(ranks)} reranker scores but {len(scores)} scores")
    best = max(range(k), key=lambda i: (ranks[i], -i))
    return float(scores[best] >= 1.0)


def mean_at_k(scores: Sequence[float], k: int) -> float:
    """The mean score of the first ``k`` samples."""
    _check_k(len(scores), k)
    return float(sum(scores[:k]) / k)


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of samples), got {k}")


def sampled_metrics(
    scores: Sequence[Sequence[float]],
    answers: Sequence[Sequence[str | None]] | None,
    ks: Sequence[int],
) -> dict[str, float]:
    """``pass@k``, ``mean@k`` and (with ``answers``) ``maj@k`` for each ``k`` in ``ks``,
    averaged over problems; ``scores[p][s]`` is sample ``s`` of problem ``p``.

    A sample is correct when its score is 1.0. Every problem needs the same number of
    samples ``n``, and each ``k`` must be at most ``n``.
    """
    if not scores:
        raise ValueError("sampled metrics need at least one problem")
    n = len(scores[0])
    if any(len(row) != n for row in scores):
        raise ValueError("every problem needs the same number of samples")
    metrics: dict[str, float] = {}
    for k in ks:
        _check_k(n, k)
        per_problem = [pass_at_k(n, sum(s >= 1.0 for s in row), k) for row in scores]
        metrics[f"pass@{k}"] = sum(per_problem) / len(scores)
        metrics[f"mean@{k}"] = sum(mean_at_k(row, k) for row in scores) / len(scores)
        if answers is not None:
            votes = [maj_at_k(a, s, k) for a, s in zip(answers, scores, strict=True)]
            metrics[f"maj@{k}"] = sum(votes) / len(scores)
    return metrics
