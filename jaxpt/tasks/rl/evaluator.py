"""Greedy held-out accuracy of an RL task's policy (``eval_accuracy``)."""

from __future__ import annotations

from collections.abc import Callable

from jaxpt.tasks import common
from jaxpt.tasks.base import RunContext
from jaxpt.tasks.rl.source import prompt_rows


def accuracy_evaluator(ctx: RunContext, cfg, policy_of: Callable = lambda state: state.model()):
    """Greedy held-out accuracy (``eval_accuracy``) of the policy on the eval prompts that
    have an ``answer`` column, scored by ``cfg.eval_reward`` (1.0 = correct); None when
    ``cfg.eval_prompts`` is 0 or no eval prompt has an answer. ``policy_of(state)`` is the
    policy module of a train state. Replies end where rollouts' do (the model dir's eos ids)."""
    from jaxpt.evals import verifiable_accuracy
    from jaxpt.rewards import resolve_reward_fn

    if not cfg.eval_prompts:
        return None
    rows = [r for r in prompt_rows(ctx, "eval") if "answer" in r][: cfg.eval_prompts]
    if not rows:
        return None
    tokenizer = common.resolve_tokenizer(ctx)
    scorer = resolve_reward_fn(cfg.eval_reward)

    def evaluate(state) -> dict[str, float]:
        result = verifiable_accuracy(
            policy_of(state), tokenizer, rows,
            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_completion_length, scorer=scorer,
            model_path=ctx.config.model.path,
        )
        return {"eval_accuracy": result["accuracy"], "eval_n": float(result["n"]),
                "eval_completion_tokens": result["mean_completion_tokens"]}

    return evaluate
