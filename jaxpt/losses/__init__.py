"""Pure loss functions over arrays, shared by the tasks (SFT, RM, DPO, GRPO, PPO).

Every loss returns per-example or per-token values plus metrics; the tasks turn them into
the (numerator, denominator) pair the train step accumulates.
"""

from jaxpt.losses.logprobs import entropy_from_logits, sequence_logprob, token_logprobs
from jaxpt.losses.policy import (
    ADVANTAGE_ESTIMATORS,
    LOSS_TYPES,
    aggregate_token_loss,
    estimate_advantages,
    group_advantages,
    has_reward_spread,
    importance_weights,
    k3_kl,
    policy_gradient_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)
from jaxpt.losses.ppo import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    adaptive_kl_update,
    clipped_value_loss,
    explained_variance,
    fixed_kl_update,
    gae_advantages,
    token_rewards,
    whiten,
)
from jaxpt.losses.preference import (
    DPO_LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from jaxpt.losses.process import first_bad_step, step_label_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "DPO_LOSS_TYPES",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "REFERENCE_FREE_LOSS_TYPES",
    "adaptive_kl_update",
    "aggregate_token_loss",
    "bradley_terry_loss",
    "clipped_value_loss",
    "dpo_loss",
    "entropy_from_logits",
    "estimate_advantages",
    "explained_variance",
    "first_bad_step",
    "fixed_kl_update",
    "gae_advantages",
    "group_advantages",
    "has_reward_spread",
    "importance_weights",
    "k3_kl",
    "kto_loss",
    "orpo_loss",
    "policy_gradient_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sequence_logprob",
    "simpo_loss",
    "step_label_loss",
    "token_logprobs",
    "token_rewards",
    "whiten",
]
