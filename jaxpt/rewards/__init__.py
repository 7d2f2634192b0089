"""Reward functions for RL with verifiable rewards (GRPO), compatible with TRL's `reward_funcs`.

The interface: a reward function is a callable

    f(prompts, completions, **dataset_columns) -> list[float | None]

returning one score per completion, or None to abstain (the function does not apply to that
row). It is called with keywords, like TRL does. `prompts` and `completions` are strings, or
conversational lists of `{"role", "content"}` messages (a completion's text is then its last
assistant message; see `completion_text`). Dataset columns (e.g. `answer`, `tests`) arrive as
keyword lists aligned with `completions`; a function should accept `**kwargs` for the others.

Built-ins, by config name (`BUILTIN_REWARDS`):
  math / accuracy  `math_reward`: 1.0 when the final answer matches the `answer` column.
  last_number      `last_number_reward`: 1.0 when the completion's last number equals `answer`
                   (for prompts that ask for just the number).
  worked_steps     `worked_steps_reward`: the share of a worked arithmetic solution's column
                   lines that match the reference built from the `problem` column.
  format           `format_reward`: 1.0 when the completion ends in `#### <number>` or has a
                   `\\boxed{}`; kwarg `pattern` sets another regex.
  code             `code_reward`: fraction of the `tests` column passed by the completion's
                   ```python block, run in the sandbox (`run_untrusted`).
  reasoning_gym    `reasoning_gym_reward`: a reasoning-gym task's own checker on the reply's
                   last `<answer>` tag, for rows of `jaxpt.data.reasoning_gym` (columns
                   `task`, `task_options`, `entry`); needs the reasoning-gym package.
`load_reward_model(dir)` loads a trained reward model (`rm` task export) as a `RewardModel`
that scores (prompt, response) pairs, or a process reward model (`prm` task export) as a
`ProcessRewardModel` that scores each step and aggregates them; it is imported lazily (it
needs the model stack).
Any other callable is named by import path, "package.module:function". `build_reward_fns`
turns config specs (names, weights, kwargs) into `RewardFn`s, and `RewardRunner` scores a batch
with them: per-function float32 arrays (NaN = abstain or failure), the weighted total, counters;
a function failing on more than ``max_error_frac`` of a batch raises ``RewardError``.
"""

from jaxpt.rewards.arithmetic import worked_steps_reward
from jaxpt.rewards.code import code_reward, extract_code
from jaxpt.rewards.format import DEFAULT_FORMAT, format_reward
from jaxpt.rewards.math import (
    accuracy,
    answers_match,
    extract_answer,
    last_number,
    last_number_reward,
    math_reward,
    normalize_number,
    reference_answer,
)
from jaxpt.rewards.reasoning_gym import reasoning_gym_reward
from jaxpt.rewards.registry import BUILTIN_REWARDS, build_reward_fns, resolve_reward_fn
from jaxpt.rewards.runner import RewardBatch, RewardError, RewardFn, RewardRunner
from jaxpt.rewards.sandbox import SandboxResult, run_untrusted
from jaxpt.rewards.text import completion_text

__all__ = [
    "BUILTIN_REWARDS",
    "DEFAULT_FORMAT",
    "RewardBatch",
    "RewardError",
    "RewardFn",
    "RewardRunner",
    "SandboxResult",
    "accuracy",
    "answers_match",
    "build_reward_fns",
    "code_reward",
    "completion_text",
    "extract_answer",
    "extract_code",
    "format_reward",
    "last_number",
    "last_number_reward",
    "load_reward_model",
    "math_reward",
    "normalize_number",
    "reasoning_gym_reward",
    "reference_answer",
    "resolve_reward_fn",
    "run_untrusted",
    "worked_steps_reward",
]


def __getattr__(name):
    # The reward model pulls in jax and the models; plain reward functions do not need them.
    if name in ("load_reward_model", "RewardModel", "ProcessRewardModel"):
        from jaxpt.rewards import reward_model

        return getattr(reward_model, name)
    raise AttributeError(f"module 'jaxpt.rewards' has no attribute {name!r}")
