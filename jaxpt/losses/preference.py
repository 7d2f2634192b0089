"""Preference losses: Bradley-Terry reward modeling and DPO (sigmoid / cDPO, IPO, hinge)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def bradley_terry_loss(reward_chosen_b, reward_rejected_b, margin_b=None, center_coef=0.0):
    """Per-pair ``-log sigmoid(r_c - r_r - margin)`` plus ``center_coef * (r_c + r_r)^2``.

    The centering term keeps rewards near zero mean (it is what makes a reward model's
    scores comparable across prompts). Returns (loss_b, metrics of per-pair values).
    """
    r_c = reward_chosen_b.astype(jnp.float32)
    r_r = reward_rejected_b.astype(jnp.float32)
    diff_b = r_c - r_r
    if margin_b is not None:
        diff_b = diff_b - margin_b.astype(jnp.float32)
    loss_b = -jax.nn.log_sigmoid(diff_b)
    if center_coef:
        loss_b = loss_b + center_coef * jnp.square(r_c + r_r)
    metrics = {
        "accuracy": (r_c > r_r).astype(jnp.float32),
        "margin": r_c - r_r,
        "reward_chosen": r_c,
        "reward_rejected": r_r,
    }
    return loss_b, metrics


def dpo_loss(
    policy_chosen_b,
    policy_rejected_b,
    ref_chosen_b,
    ref_rejected_b,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
):
    """Per-pair DPO loss from sequence log-probabilities (summed over response tokens).

    ``h = (pi_c - pi_r) - (ref_c - ref_r)``;
    sigmoid: ``-(1-ls) log sigma(beta h) - ls log sigma(-beta h)`` (cDPO when ls > 0);
    ipo: ``(h - 1/(2 beta))^2``; hinge: ``relu(1 - beta h)``.
    Returns (loss_b, metrics) with the implicit rewards ``beta (pi - ref)``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose from {DPO_LOSS_TYPES}")
    chosen_logratio_b = policy_chosen_b - ref_chosen_b
    rejected_logratio_b = policy_rejected_b - ref_rejected_b
    h_b = chosen_logratio_b - rejected_logratio_b
    if loss_type == "sigmoid":
        loss_b = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h_b) - (
            label_smoothing * jax.nn.log_sigmoid(-beta * h_b)
        )
    elif loss_type == "ipo":
        loss_b = jnp.square(h_b - 1 / (2 * beta))
    else:
        loss_b = jax.nn.relu(1 - beta * h_b)
    reward_chosen_b = beta * jax.lax.stop_gradient(chosen_logratio_b)
    reward_rejected_b = beta * jax.lax.stop_gradient(rejected_logratio_b)
    metrics = {
        "rewards/chosen": reward_chosen_b,
        "rewards/rejected": reward_rejected_b,
        "rewards/margins": reward_chosen_b - reward_rejected_b,
        "rewards/accuracy": (reward_chosen_b > reward_rejected_b).astype(jnp.float32),
        "logps/chosen": jax.lax.stop_gradient(policy_chosen_b),
        "logps/rejected": jax.lax.stop_gradient(policy_rejected_b),
    }
    return loss_b, metrics
