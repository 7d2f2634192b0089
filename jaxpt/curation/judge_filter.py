"""The judge filter: an LLM judge (``jaxpt.judges.RubricJudge``) scores each row's response
against a rubric, and rows below a minimum score go."""

from __future__ import annotations

from jaxpt.curation.base import CurationStep, Removed, prompt_text, response_text


class JudgeFilter(CurationStep):
    """Rows whose response a rubric judge scores below ``min_score`` (on the judge's
    ``score_range``), or whose reply has no valid score (unless ``keep_unscored``).

    ``model`` is any path ``jaxpt.models.load_model`` takes (or a loaded model, with
    ``tokenizer``); ``rubric`` and ``template`` are the judge's (``jaxpt.judges``); other
    keyword arguments go to ``RubricJudge`` (``max_new_tokens``, ``batch_size``, ...). The
    question shown to the judge is the row's prompt side, the answer its response.
    """

    name = "judge"

    def __init__(self, model=None, min_score: float = 7, rubric: str | None = None,
                 score_range: tuple[int, int] = (1, 10), keep_unscored: bool = False,
                 **judge_options):
        from jaxpt.judges import DEFAULT_RUBRIC, RubricJudge

        low, high = score_range
        if not low <= min_score <= high:
            raise ValueError(f"min_score {min_score} is outside score_range {score_range}")
        self.min_score, self.keep_unscored = min_score, keep_unscored
        self.judge = RubricJudge(model, rubric=rubric or DEFAULT_RUBRIC, min_score=low,
                                 max_score=high, **judge_options)

    def __call__(self, rows: list[dict]) -> tuple[list[dict], Removed]:
        scores = self.judge.score([prompt_text(r) for r in rows], [response_text(r) for r in rows])
        kept, removed = [], []
        for row, score in zip(rows, scores):
            if score is None:
                if self.keep_unscored:
                    kept.append(row)
                else:
                    removed.append((row, "judge gave no valid score"))
            elif score < self.min_score:
                removed.append((row, f"judge score {score:g} < {self.min_score:g}"))
            else:
                kept.append(row)
        return kept, removed
