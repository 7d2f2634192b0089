"""Evaluations of trained models (automated, program-scored)."""

from jaxpt.evals.ratings import (
    annotator_agreement,
    bradley_terry,
    cohen_kappa,
    elo,
    elo_averaged,
    fleiss_kappa,
    rating_table,
)
from jaxpt.evals.runner import TaskResult, evaluate_task, evaluate_tasks, write_results
from jaxpt.evals.sampled import maj_at_k, mean_at_k, pass_at_k, sampled_metrics
from jaxpt.evals.scorers import SCORERS, Scored, Scorer, get_scorer
from jaxpt.evals.stats import (
    bootstrap_ci,
    compare_outcomes,
    fit_logistic,
    length_controlled_win_rate,
    win_counts,
)
from jaxpt.evals.tasks import (
    EvalExample,
    EvalTask,
    TaskConfigError,
    humaneval_rows,
    load_task_examples,
    parse_task,
    parse_tasks,
)
from jaxpt.evals.verifiable import verifiable_accuracy

__all__ = [
    "SCORERS",
    "EvalExample",
    "EvalTask",
    "Scored",
    "Scorer",
    "TaskConfigError",
    "TaskResult",
    "annotator_agreement",
    "bootstrap_ci",
    "bradley_terry",
    "cohen_kappa",
    "compare_outcomes",
    "elo",
    "elo_averaged",
    "evaluate_task",
    "evaluate_tasks",
    "fit_logistic",
    "fleiss_kappa",
    "get_scorer",
    "humaneval_rows",
    "length_controlled_win_rate",
    "load_task_examples",
    "maj_at_k",
    "mean_at_k",
    "parse_task",
    "parse_tasks",
    "pass_at_k",
    "rating_table",
    "sampled_metrics",
    "verifiable_accuracy",
    "win_counts",
    "write_results",
]
