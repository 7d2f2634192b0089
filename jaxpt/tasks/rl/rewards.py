"""Reward settings of the RL tasks, and the scoring step that RL rollouts and rejection
sampling share: the reward functions of prompt rows' completions, through
``jaxpt.rewards.RewardRunner``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One reward function: a built-in name (math, accuracy, format, code) or an import path
    ``package.module:function`` in ``fn``; its weight in the total; keyword arguments."""

    name: str | None = None
    fn: str | None = None
    weight: float = 1.0
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def reward_specs(cfg) -> list[dict]:
    """A task section's ``rewards`` entries as ``jaxpt.rewards.build_reward_fns`` takes them."""
    return [
        {k: v for k, v in dataclasses.asdict(s).items() if v not in (None, {})}
        for s in cfg.rewards
    ]


def reward_model_spec(ctx, path: str, weight: float = 1.0) -> dict:
    """A reward-function entry (``reward_model``) scoring completions with the reward
    model at ``path`` (what ``task: rm`` or ``task: prm`` exports), on the run's mesh and
    tokenizer."""
    from jaxpt.rewards import load_reward_model
    from jaxpt.tasks import common

    scorer = load_reward_model(path, mesh=ctx.mesh, rules=ctx.rules,
                               tokenizer=common.resolve_tokenizer(ctx))

    def reward_model(prompts, completions, **_):
        return [float(s) for s in scorer.score(prompts, completions)]

    return {"name": "reward_model", "fn": reward_model, "weight": weight}


def check_reward_settings(section: str, cfg) -> None:
    """A ConfigError naming ``<section>.rewards`` or ``<section>.eval_reward`` when a reward
    function cannot be built (an RL task's load-time check)."""
    from jaxpt.config import ConfigError
    from jaxpt.rewards import build_reward_fns, resolve_reward_fn

    for key, build in (("rewards", lambda: build_reward_fns(reward_specs(cfg))),
                       ("eval_reward", lambda: resolve_reward_fn(cfg.eval_reward))):
        try:
            build()
        except (ValueError, TypeError, ImportError, AttributeError) as error:
            raise ConfigError(f"config key '{section}.{key}': {error}") from None


# Row columns that are not passed to reward functions: the prompt goes as ``prompts``.
_NOT_COLUMNS = ("prompt", "messages", "id")


def score_completions(runner, rows: Sequence[dict], completions: Sequence[str],
                      samples_per_row: int):
    """Scores (a ``jaxpt.rewards.RewardBatch``) of ``samples_per_row`` completions of each
    prompt row, prompt-major: each reward function gets the rows' prompts and their other
    columns (``answer``, ``tests``, ...) beside the completions."""
    sample_rows = [row for row in rows for _ in range(samples_per_row)]
    columns = {k: [row.get(k) for row in sample_rows] for k in sample_rows[0]
               if k not in _NOT_COLUMNS}
    return runner([row["prompt"] for row in sample_rows], list(completions), **columns)
