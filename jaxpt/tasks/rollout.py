"""The RL rollout pieces under their former import path; they live in ``jaxpt.tasks.rl``."""

from jaxpt.tasks.rl.batch import (
    Rollout,
    completion_window,
    minibatch_rows,
    shares_prompts,
    train_batch,
)
from jaxpt.tasks.rl.evaluator import accuracy_evaluator
from jaxpt.tasks.rl.forward import completion_hidden
from jaxpt.tasks.rl.program import BatchFinisher, RolloutProgram
from jaxpt.tasks.rl.rewards import RewardSpec, check_reward_settings, reward_specs
from jaxpt.tasks.rl.source import (
    GroupFilter,
    MakeBatch,
    PolicyView,
    RolloutSource,
    prompt_rows,
    whole_model,
)

__all__ = [
    "BatchFinisher",
    "GroupFilter",
    "MakeBatch",
    "PolicyView",
    "RewardSpec",
    "Rollout",
    "RolloutProgram",
    "RolloutSource",
    "accuracy_evaluator",
    "check_reward_settings",
    "completion_hidden",
    "completion_window",
    "minibatch_rows",
    "prompt_rows",
    "reward_specs",
    "shares_prompts",
    "train_batch",
    "whole_model",
]
