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
    if ctx.config.envs.enabled():
        return episode_evaluator(ctx, cfg, rows, tokenizer, scorer, policy_of)

    def evaluate(state) -> dict[str, float]:
        result = verifiable_accuracy(
            policy_of(state), tokenizer, rows,
            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_completion_length, scorer=scorer,
            model_path=ctx.config.model.path,
        )
        return {"eval_accuracy": result["accuracy"], "eval_n": float(result["n"]),
                "eval_completion_tokens": result["mean_completion_tokens"]}

    return evaluate


def episode_evaluator(ctx: RunContext, cfg, rows, tokenizer, scorer, policy_of: Callable):
    """Greedy episodes (the run's ``envs``) on the eval rows: ``eval_accuracy`` of the final
    answers, the share of episodes that called a tool and the tool errors per episode; with
    ``envs.eval_without_tools`` the same with the tools withheld (``..._no_tools``)."""
    import jax
    import numpy as np

    from jaxpt.data import eos_token_ids
    from jaxpt.sampling import SamplingConfig
    from jaxpt.tasks.rl.episodes import episode_metrics, episode_runner

    sampling = SamplingConfig.make(
        max_new_tokens=cfg.eval_max_new_tokens or cfg.max_completion_length, temperature=0.0,
        eos_token_id=eos_token_ids(tokenizer, ctx.config.model.path),
        pad_token_id=tokenizer.pad_token_id or 0)
    variants = {"": False}
    if ctx.config.envs.eval_without_tools:
        variants["_no_tools"] = True
    runners = {suffix: episode_runner(ctx, tokenizer, sampling, cfg.max_prompt_length,
                                      sampling.max_new_tokens, without_tools=without)
               for suffix, without in variants.items()}

    def evaluate(state) -> dict[str, float]:
        from flax import nnx

        policy = nnx.split(policy_of(state))
        metrics = {}
        for suffix, runner in runners.items():
            episodes = runner.run(policy, rows, list(range(len(rows))), jax.random.key(0))
            answers = [e.final_text for e in episodes]
            columns = {key: [r.get(key) for r in rows]
                       for key in dict.fromkeys(k for r in rows for k in r)
                       if key not in ("prompt", "completions")}
            scores = scorer(prompts=[r["prompt"] for r in rows], completions=answers, **columns)
            correct = np.array([s == 1.0 for s in scores], np.float64)
            shown = episode_metrics(episodes, prefix="")
            metrics.update({
                f"eval_accuracy{suffix}": float(correct.mean()),
                f"eval_tool_call_rate{suffix}": shown["tool_call_rate"],
                f"eval_tool_errors{suffix}": shown["tool_errors"],
                f"eval_turns{suffix}": shown["turns"],
            })
        metrics["eval_n"] = float(len(rows))
        return metrics

    return evaluate
