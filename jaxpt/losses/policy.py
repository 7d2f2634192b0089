"""Policy-gradient pieces for GRPO and its variants (Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++).

All functions are pure and shape-polymorphic; masks are float or bool arrays aligned
with the completion tokens (1 = a generated token that is trained on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# How token losses reduce (see aggregate_token_loss); cispo also changes the objective.
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_LEVELS = ("token", "sequence")
IMPORTANCE_CORRECTIONS = ("none", "tis", "mis")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")


def group_advantages(rewards_pg, *, scale_by_std: bool = True, eps: float = 1e-4):
    """Group-relative advantages [P, G] for G completions of each of P prompts.

    Mean-centred per group; divided by the group's standard deviation (unbiased, as TRL
    computes it) unless ``scale_by_std`` is False (Dr. GRPO). A group whose rewards are all
    equal gets zero advantages. Also returns a [P] mask of groups with any reward spread
    (for dynamic sampling).
    """
    rewards_pg = rewards_pg.astype(jnp.float32)
    mean_p1 = jnp.mean(rewards_pg, axis=1, keepdims=True)
    centred_pg = rewards_pg - mean_p1
    group_size = rewards_pg.shape[1]
    std_p1 = jnp.sqrt(jnp.sum(centred_pg**2, axis=1, keepdims=True) / max(group_size - 1, 1))
    advantages_pg = centred_pg / (std_p1 + eps) if scale_by_std else centred_pg
    return advantages_pg, has_reward_spread(rewards_pg)


def has_reward_spread(rewards_pg):
    """[P] bool: groups whose rewards are not all equal (the same for every estimator)."""
    return jnp.max(rewards_pg, axis=1) > jnp.min(rewards_pg, axis=1)


def rloo_advantages(rewards_pg):
    """REINFORCE Leave-One-Out advantages [P, G] (Ahmadian et al. 2024, arXiv:2402.14740).

    Each completion's baseline is the mean reward of the other G - 1 completions of its
    prompt: ``A_i = r_i - (sum_j r_j - r_i) / (G - 1)``, which equals
    ``G / (G - 1) * (r_i - mean_j r_j)``. No std scaling (as in OpenRLHF's and verl's
    ``rloo``). Groups whose rewards are all equal get exactly zero. Also returns the [P]
    has-spread mask. Needs G >= 2.
    """
    group_size = rewards_pg.shape[1]
    if group_size < 2:
        raise ValueError(f"RLOO's leave-one-out baseline needs >= 2 completions per prompt, "
                         f"got {group_size}")
    rewards_pg = rewards_pg.astype(jnp.float32)
    has_spread_p = has_reward_spread(rewards_pg)
    others_mean_pg = (jnp.sum(rewards_pg, axis=1, keepdims=True) - rewards_pg) / (group_size - 1)
    # Exact zeros where all rewards agree, not float round-off from the sum and division.
    advantages_pg = jnp.where(has_spread_p[:, None], rewards_pg - others_mean_pg, 0.0)
    return advantages_pg, has_spread_p


def reinforce_pp_advantages(rewards_pg, *, weights_pg=None, eps: float = 1e-4):
    """REINFORCE++-baseline advantages [P, G] for outcome rewards (Hu et al.,
    arXiv:2501.03262; OpenRLHF's ``reinforce_baseline``, verl's ``reinforce_plus_plus_baseline``).

    1. Per prompt, subtract the group mean: ``c_i = r_i - mean_group(r)`` (no group std).
    2. Normalise over the whole batch: ``A_i = (c_i - m) / (s + eps)`` with ``m`` and ``s``
       the weighted mean and population (biased) std of ``c`` over all P * G completions.

    ``weights_pg`` is how much each completion counts in ``m`` and ``s``: OpenRLHF and verl
    whiten over response tokens, which for one reward per completion (and no KL folded into
    the reward) is weighting each completion by its trained token count; zero drops a
    completion from the statistics. None weighs every completion once. Differences from
    the references: ``+ eps`` on the std (OpenRLHF clamps the variance at 1e-8, verl adds
    1e-8 to an unbiased variance). A batch of all-equal rewards gets zeros. Also returns the
    [P] has-spread mask.
    """
    rewards_pg = rewards_pg.astype(jnp.float32)
    has_spread_p = has_reward_spread(rewards_pg)
    centred_pg = rewards_pg - jnp.mean(rewards_pg, axis=1, keepdims=True)
    centred_pg = jnp.where(has_spread_p[:, None], centred_pg, 0.0)
    if weights_pg is None:
        weights_pg = jnp.ones_like(rewards_pg)
    weights_pg = weights_pg.astype(jnp.float32)
    total_weight = jnp.maximum(jnp.sum(weights_pg), 1e-8)  # all rows dropped: zeros, not NaN
    batch_mean = jnp.sum(weights_pg * centred_pg) / total_weight
    batch_std = jnp.sqrt(jnp.sum(weights_pg * (centred_pg - batch_mean) ** 2) / total_weight)
    return (centred_pg - batch_mean) / (batch_std + eps), has_spread_p


def estimate_advantages(
    rewards_pg, estimator: str = "grpo", *, scale_by_std: bool = True, weights_pg=None,
    eps: float = 1e-4,
):
    """Advantages [P, G] by ``estimator`` (one of ``ADVANTAGE_ESTIMATORS``) and the [P]
    has-spread mask, which does not depend on the estimator.

    grpo: ``group_advantages`` (``scale_by_std`` applies only here); rloo:
    ``rloo_advantages``; reinforce_pp: ``reinforce_pp_advantages`` (``weights_pg`` applies
    only here).
    """
    if estimator == "grpo":
        return group_advantages(rewards_pg, scale_by_std=scale_by_std, eps=eps)
    if estimator == "rloo":
        return rloo_advantages(rewards_pg)
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards_pg, weights_pg=weights_pg, eps=eps)
    raise ValueError(
        f"unknown advantage estimator {estimator!r}; choose from {ADVANTAGE_ESTIMATORS}"
    )


def k3_kl(logp_bt, ref_logp_bt):
    """The k3 estimator of KL(pi || ref) per token: ``exp(r) - r - 1`` with ``r = ref - logp``."""
    log_ratio_bt = ref_logp_bt - logp_bt
    return jnp.exp(log_ratio_bt) - log_ratio_bt - 1


def aggregate_token_loss(loss_bt, mask_bt, loss_type: str, max_completion_length: int):
    """Reduce a per-token loss to ``(numerator, denominator)``; loss = numerator / denominator.

    grpo: mean over each sequence's tokens, then mean over sequences;
    dr_grpo: sum over tokens / max_completion_length, mean over sequences;
    dapo, cispo: mean over all tokens of the batch.
    The pair form keeps gradient accumulation exact: micro-batch numerators and
    denominators add up to the full batch's.
    """
    mask_bt = mask_bt.astype(jnp.float32)
    tokens_b = jnp.sum(mask_bt, axis=-1)
    token_sum_b = jnp.sum(loss_bt * mask_bt, axis=-1)
    if loss_type == "grpo":
        has_tokens_b = (tokens_b > 0).astype(jnp.float32)
        return jnp.sum(token_sum_b / jnp.maximum(tokens_b, 1.0)), jnp.sum(has_tokens_b)
    if loss_type == "dr_grpo":
        return jnp.sum(token_sum_b) / max_completion_length, jnp.float32(loss_bt.shape[0])
    if loss_type in ("dapo", "cispo"):
        return jnp.sum(token_sum_b), jnp.sum(tokens_b)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose from {LOSS_TYPES}")


def policy_gradient_loss(
    logp_bt,
    old_logp_bt,
    advantages_b,
    mask_bt,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    importance_level: str = "token",
    ref_logp_bt=None,
    beta: float = 0.0,
    objective: str = "clip",
    weights_bt=None,
):
    """Clipped-ratio surrogate per token [B, T] (to minimise) and per-token metrics.

    ``advantages_b`` is one advantage per sequence [B] or one per token [B, T].

    ``ratio = exp(logp - old_logp)`` per token, or GSPO's sequence-level
    ``exp(mean_t(logp - old_logp))`` broadcast over the sequence's tokens;
    ``loss = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta k3``.
    ``objective="cispo"`` (MiniMax-M1): the clipped ratio weighs the log-prob's gradient
    and is not differentiated, so no token's gradient is dropped by the clip:
    ``loss = -sg(clip(ratio, 1 - eps_low, 1 + eps_high)) A logp + beta k3``.
    ``weights_bt`` (not differentiated) multiply each token's policy term: the importance
    weights of a sampler/trainer mismatch (``importance_weights``).
    """
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(
            f"unknown importance_level {importance_level!r}; choose from {IMPORTANCE_LEVELS}"
        )
    mask_bt = mask_bt.astype(jnp.float32)
    log_ratio_bt = logp_bt - old_logp_bt
    if importance_level == "sequence":
        seq_log_ratio_b = jnp.sum(log_ratio_bt * mask_bt, -1) / jnp.maximum(jnp.sum(mask_bt, -1), 1)
        # Keep the per-token gradient path (as GSPO-token does) with the sequence's value.
        log_ratio_bt = logp_bt - jax.lax.stop_gradient(logp_bt) + jax.lax.stop_gradient(
            seq_log_ratio_b[:, None]
        )
    ratio_bt = jnp.exp(log_ratio_bt)
    # One advantage per sequence [B] (GRPO) or per token [B, T] (PPO's GAE).
    advantages = advantages_b.astype(jnp.float32)
    adv_b1 = advantages[:, None] if advantages.ndim == 1 else advantages
    clipped_bt = jnp.clip(ratio_bt, 1 - epsilon_low, 1 + epsilon_high)
    if objective == "cispo":
        loss_bt = -jax.lax.stop_gradient(clipped_bt) * adv_b1 * logp_bt
        metrics = {
            "clip_low": (ratio_bt < 1 - epsilon_low).astype(jnp.float32),
            "clip_high": (ratio_bt > 1 + epsilon_high).astype(jnp.float32),
        }
    elif objective == "clip":
        loss_bt = -jnp.minimum(ratio_bt * adv_b1, clipped_bt * adv_b1)
        metrics = {
            "clip_low": ((ratio_bt < 1 - epsilon_low) & (adv_b1 < 0)).astype(jnp.float32),
            "clip_high": ((ratio_bt > 1 + epsilon_high) & (adv_b1 > 0)).astype(jnp.float32),
        }
    else:
        raise ValueError(f"unknown policy objective {objective!r}; choose clip or cispo")
    if weights_bt is not None:
        loss_bt = loss_bt * jax.lax.stop_gradient(weights_bt)
    if ref_logp_bt is not None and beta:
        kl_bt = k3_kl(logp_bt, ref_logp_bt)
        loss_bt = loss_bt + beta * kl_bt
        metrics["kl"] = jax.lax.stop_gradient(kl_bt)
    return loss_bt, metrics


def importance_weights(trainer_logp_bt, sampler_logp_bt, mask_bt, correction: str,
                       cap: float):
    """Per-token weights [B, T] correcting the gap between the sampler's log-probs and the
    trainer's recomputed ones for the same policy, ``w = exp(trainer - sampler)``:
    ``tis`` truncates them at ``cap`` (``min(w, cap)``), ``mis`` masks tokens whose weight
    exceeds ``cap`` (``w``, or 0 above the cap). Metrics per token: ``mismatch_kl`` (the k3
    estimate of KL(sampler || trainer) on the sampled tokens), ``is_weight`` (the raw w),
    ``is_capped`` (tokens over the cap). Masked positions weigh 1 and count nothing."""
    if correction not in IMPORTANCE_CORRECTIONS[1:]:
        raise ValueError(
            f"unknown importance correction {correction!r}; choose from "
            f"{IMPORTANCE_CORRECTIONS}"
        )
    mask_bt = mask_bt.astype(bool)
    log_w_bt = jnp.where(mask_bt, trainer_logp_bt - sampler_logp_bt, 0.0)
    w_bt = jnp.exp(log_w_bt)
    capped_bt = w_bt > cap
    if correction == "tis":
        weights_bt = jnp.minimum(w_bt, cap)
    else:
        weights_bt = jnp.where(capped_bt, 0.0, w_bt)
    metrics = {
        # k3 of KL(pi || ref) with pi = the sampler (its tokens) and ref = the trainer.
        "mismatch_kl": jnp.where(mask_bt, k3_kl(sampler_logp_bt, trainer_logp_bt), 0.0),
        "is_weight": w_bt,
        "is_capped": capped_bt.astype(jnp.float32),
    }
    return weights_bt, metrics
