"""Completed human-evaluation files → comparisons, ratings and annotator agreement.

A results file is the jsonl the evaluation page downloads: one row per judged item with
``id``, ``left_model``, ``right_model``, ``choice`` (left / right / tie) and
``annotator``. The same annotator judging the same item again (a page saved twice, or a
file given twice) counts once: the last row read wins.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxpt.evals.ratings import annotator_agreement, rating_table
from jaxpt.human.jsonl import json_objects

CHOICES = ("left", "right", "tie")
REQUIRED = ("id", "left_model", "right_model", "choice", "annotator")


def read_results(paths: Sequence[str]) -> tuple[list[dict], int]:
    """The judgements in ``paths`` (one per annotator and item) and how many repeated rows
    were replaced. Errors name the file and line."""
    by_key: dict[tuple[str, str], dict] = {}
    replaced = 0
    for path in paths:
        for where, row in json_objects(path, REQUIRED):
            if row["choice"] not in CHOICES:
                raise ValueError(
                    f"{where}: 'choice' must be one of {CHOICES}, got {row['choice']!r}"
                )
            if row["left_model"] == row["right_model"]:
                raise ValueError(f"{where}: left_model and right_model are the same")
            if not str(row["annotator"]).strip():
                raise ValueError(f"{where}: empty 'annotator'")
            key = (str(row["annotator"]), str(row["id"]))
            replaced += key in by_key
            by_key[key] = {**row, "source": where}
    if not by_key:
        raise ValueError(f"no judgements in {', '.join(paths)}")
    return list(by_key.values()), replaced


def winner(row: dict) -> str:
    """The model a judgement prefers, or "tie"."""
    return "tie" if row["choice"] == "tie" else row[f"{row['choice']}_model"]


def comparisons(rows: Sequence[dict]) -> list[tuple[str, str, float]]:
    """``(left_model, right_model, score_left)`` per judgement (a tie scores 0.5)."""
    score = {"left": 1.0, "right": 0.0, "tie": 0.5}
    return [(r["left_model"], r["right_model"], score[r["choice"]]) for r in rows]


def agreement(rows: Sequence[dict]) -> dict | None:
    """Annotator agreement on items judged by several annotators (labels: the preferred
    model or "tie"), or None when no item overlaps."""
    labels: dict[str, dict[str, str]] = {}
    for row in rows:
        labels.setdefault(str(row["id"]), {})[str(row["annotator"])] = winner(row)
    return annotator_agreement(labels)


def summarize(
    paths: Sequence[str], *, n_boot: int = 200, confidence: float = 0.95, seed: int = 0,
    k: float = 32.0,
) -> dict:
    """Ratings (Bradley-Terry and Elo with bootstrap CIs, records) per model, agreement
    and counts over the results files ``paths``."""
    rows, replaced = read_results(paths)
    return {
        "models": rating_table(
            comparisons(rows), n_boot=n_boot, confidence=confidence, seed=seed, k=k
        ),
        "agreement": agreement(rows),
        "n_judgements": len(rows),
        "n_items": len({str(r["id"]) for r in rows}),
        "annotators": sorted({str(r["annotator"]) for r in rows}),
        "replaced_repeats": replaced,
    }
