"""RLAIF preference labels: a pairwise judge turns unlabeled answer pairs into the
``prompt``/``chosen``/``rejected`` rows that ``task: rm`` and ``task: dpo`` read.

Each pair is judged in both orders (``PairwiseJudge``). A decisive verdict becomes a
preference row; a tie (including the two orders disagreeing, i.e. position bias) is dropped
and counted, and with ``consistent_only`` so is every pair whose two orders did not name the
same answer. Rows may carry a ground-truth ``truth_field`` ("a" or "b"), against which the
labels' accuracy is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jaxpt.judges.pairwise import PairwiseVerdict, summarize

PAIR_FIELDS = ("response_a", "response_b")


def check_pair_rows(rows: Sequence[dict], source: str, a_field: str, b_field: str,
                    truth_field: str | None = None) -> None:
    """A DataError naming the source and row of the first row that lacks a field."""
    from jaxpt.data import DataError

    for index, row in enumerate(rows):
        problem = None if isinstance(row, dict) else "is not a JSON object"
        for field in ("prompt", a_field, b_field):
            if problem is None and row.get(field) in (None, "", []):
                problem = f"has no {field!r}"
        if problem is not None:
            raise DataError(f"{source}: row {index} {problem}")
        if truth_field is not None and row.get(truth_field) not in ("a", "b"):
            raise DataError(f"{source}: row {index}: {truth_field!r} must be 'a' or 'b', "
                             f"got {row.get(truth_field)!r}")


def preference_rows(
    rows: Sequence[dict],
    verdicts: Sequence[PairwiseVerdict],
    *,
    a_field: str = "response_a",
    b_field: str = "response_b",
    consistent_only: bool = False,
) -> list[dict]:
    """One ``prompt``/``chosen``/``rejected`` row per decisive verdict (see module docs);
    each keeps the input's ``id`` and records the judge's ``judge_score_a`` and
    ``judge_consistent``."""
    out = []
    for row, verdict in zip(rows, verdicts, strict=True):
        if verdict.winner == "tie" or (consistent_only and not verdict.consistent):
            continue
        a, b = row[a_field], row[b_field]
        chosen, rejected = (a, b) if verdict.winner == "a" else (b, a)
        prompt = row["prompt"]
        label = {"prompt": prompt, "chosen": _as_reply(prompt, chosen),
                 "rejected": _as_reply(prompt, rejected),
                 "judge_score_a": verdict.score_a, "judge_consistent": verdict.consistent}
        if "id" in row:
            label["id"] = row["id"]
        out.append(label)
    return out


def label_summary(rows: Sequence[dict], verdicts: Sequence[PairwiseVerdict], written: int,
                  truth_field: str | None = None) -> dict:
    """The judge's ``summarize`` plus rows written and, with a ground truth, the accuracy of
    its decisive labels (``label_accuracy``), of its consistent ones, and their coverage."""
    summary = {**summarize(list(verdicts)), "written": written}
    if truth_field is None:
        return summary
    truth = np.array([r[truth_field] for r in rows])
    winners = np.array([v.winner for v in verdicts])
    consistent = np.array([v.consistent for v in verdicts], bool)
    decisive = winners != "tie"
    right = winners == truth
    summary.update(
        label_accuracy=_share(right, decisive),
        label_accuracy_consistent=_share(right, decisive & consistent),
        decisive_frac=float(decisive.mean()) if len(rows) else math.nan,
        correct_frac=float(right.mean()) if len(rows) else math.nan,  # ties count as wrong
    )
    return summary


def arithmetic_answer_pairs(n: int, seed: int = 0, **task_kwargs) -> list[dict]:
    """``n`` pairs from the shipped arithmetic task's test split: the right worked answer
    and a plausible wrong one (a dropped carry or a slipped column) in a seeded random
    order; ``better`` names the right one ("a" or "b"), the verifiable ground truth."""
    from jaxpt.data import generate_preference_pairs

    rng = np.random.default_rng([seed, 7])
    rows = []
    for pair in generate_preference_pairs(n, seed, "test", **task_kwargs):
        right, wrong = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        right_first = bool(rng.random() < 0.5)
        a, b = (right, wrong) if right_first else (wrong, right)
        rows.append({"id": pair["id"], "prompt": pair["prompt"], "response_a": a,
                     "response_b": b, "better": "a" if right_first else "b",
                     "answer": pair["answer"]})
    return rows


def _as_reply(prompt, response):
    """``response`` in the form the preference readers pair with ``prompt``: text after a
    text prompt, an assistant message list after a conversation."""
    if isinstance(prompt, list) and isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    if isinstance(prompt, str) and isinstance(response, list):
        from jaxpt.rewards.text import completion_text

        return completion_text(response)
    return response


def _share(hits: np.ndarray, among: np.ndarray) -> float:
    return float(hits[among].mean()) if among.any() else math.nan
