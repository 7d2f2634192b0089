"""Policy-gradient pieces for GRPO and its variants (Dr. GRPO, DAPO, GSPO).

All functions are pure and shape-polymorphic; masks are float or bool arrays aligned
with the completion tokens (1 = a generated token that is trained on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")


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
    has_spread_p = jnp.max(rewards_pg, axis=1) > jnp.min(rewards_pg, axis=1)
    return advantages_pg, has_spread_p


def k3_kl(logp_bt, ref_logp_bt):
    """The k3 estimator of KL(pi || ref) per token: ``exp(r) - r - 1`` with ``r = ref - logp``."""
    log_ratio_bt = ref_logp_bt - logp_bt
    return jnp.exp(log_ratio_bt) - log_ratio_bt - 1


def aggregate_token_loss(loss_bt, mask_bt, loss_type: str, max_completion_length: int):
    """Reduce a per-token loss to ``(numerator, denominator)``; loss = numerator / denominator.

    grpo: mean over each sequence's tokens, then mean over sequences;
    dr_grpo: sum over tokens / max_completion_length, mean over sequences;
    dapo: mean over all tokens of the batch.
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
    if loss_type == "dapo":
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
):
    """Clipped-ratio surrogate per token [B, T] (to minimise) and per-token metrics.

    ``ratio = exp(logp - old_logp)`` per token, or GSPO's sequence-level
    ``exp(mean_t(logp - old_logp))`` broadcast over the sequence's tokens;
    ``loss = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta k3``.
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
    adv_b1 = advantages_b[:, None].astype(jnp.float32)
    clipped_bt = jnp.clip(ratio_bt, 1 - epsilon_low, 1 + epsilon_high)
    loss_bt = -jnp.minimum(ratio_bt * adv_b1, clipped_bt * adv_b1)
    metrics = {
        "clip_low": ((ratio_bt < 1 - epsilon_low) & (adv_b1 < 0)).astype(jnp.float32),
        "clip_high": ((ratio_bt > 1 + epsilon_high) & (adv_b1 > 0)).astype(jnp.float32),
    }
    if ref_logp_bt is not None and beta:
        kl_bt = k3_kl(logp_bt, ref_logp_bt)
        loss_bt = loss_bt + beta * kl_bt
        metrics["kl"] = jax.lax.stop_gradient(kl_bt)
    return loss_bt, metrics
