"""LLM judges: a jaxpt model, prompted through editable ``str.format`` templates, compares
two answers (``PairwiseJudge``, asked in both orders to cancel position bias) or scores one
against a rubric (``RubricJudge``, also a TRL-style reward function).

Both run batched, greedy ``jaxpt.sampling.PromptSampler`` calls; a judge's ``generator`` can be
any callable mapping prompt texts to reply texts (tests use a fake). ``rubric_reward`` is the
rubric judge as a config reward function: ``fn: jaxpt.judges:rubric_reward`` with
``kwargs: {model: <path>, ...}``.
"""

from jaxpt.judges.generator import ModelGenerator
from jaxpt.judges.pairwise import (
    PairwiseJudge,
    PairwiseVerdict,
    agreement,
    combine,
    parse_verdict,
    position_bias,
    question_text,
    summarize,
)
from jaxpt.judges.rubric import RubricJudge, RubricScore, parse_score, rubric_reward
from jaxpt.judges.templates import (
    DEFAULT_RUBRIC,
    PAIRWISE_TEMPLATE,
    RUBRIC_TEMPLATE,
    TemplateError,
    check_template,
    placeholders,
)

__all__ = [
    "DEFAULT_RUBRIC",
    "PAIRWISE_TEMPLATE",
    "RUBRIC_TEMPLATE",
    "ModelGenerator",
    "PairwiseJudge",
    "PairwiseVerdict",
    "RubricJudge",
    "RubricScore",
    "TemplateError",
    "agreement",
    "check_template",
    "combine",
    "parse_score",
    "parse_verdict",
    "placeholders",
    "position_bias",
    "question_text",
    "rubric_reward",
    "summarize",
]
