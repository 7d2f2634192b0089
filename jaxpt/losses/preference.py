"""Preference losses: Bradley-Terry reward modeling, DPO (sigmoid / cDPO, IPO, hinge) and the
reference-free SimPO and ORPO, and KTO on unpaired examples."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Against a frozen reference, then the reference-free ones (length-normalised log-probs).
REFERENCE_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")
DPO_LOSS_TYPES = REFERENCE_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES


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
    if loss_type not in REFERENCE_LOSS_TYPES:
        raise ValueError(
            f"unknown DPO loss_type {loss_type!r}; choose from {REFERENCE_LOSS_TYPES}"
        )
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
    metrics = _reward_metrics(beta * chosen_logratio_b, beta * rejected_logratio_b,
                              policy_chosen_b, policy_rejected_b)
    return loss_b, metrics


def _average_logps(logps_b, tokens_b):
    return logps_b / jnp.maximum(tokens_b.astype(jnp.float32), 1.0)


def _reward_metrics(reward_chosen_b, reward_rejected_b, policy_chosen_b, policy_rejected_b):
    reward_chosen_b = jax.lax.stop_gradient(reward_chosen_b)
    reward_rejected_b = jax.lax.stop_gradient(reward_rejected_b)
    return {
        "rewards/chosen": reward_chosen_b,
        "rewards/rejected": reward_rejected_b,
        "rewards/margins": reward_chosen_b - reward_rejected_b,
        "rewards/accuracy": (reward_chosen_b > reward_rejected_b).astype(jnp.float32),
        "logps/chosen": jax.lax.stop_gradient(policy_chosen_b),
        "logps/rejected": jax.lax.stop_gradient(policy_rejected_b),
    }


def simpo_loss(policy_chosen_b, policy_rejected_b, chosen_tokens_b, rejected_tokens_b, *,
               beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0):
    """Per-pair SimPO loss (Meng et al. 2024): no reference, the implicit reward is the
    length-normalised log-probability ``beta * logp / tokens``, with a target margin ``gamma``:
    ``-(1-ls) log sigma(r_c - r_r - gamma) - ls log sigma(gamma - r_c + r_r)``."""
    reward_chosen_b = beta * _average_logps(policy_chosen_b, chosen_tokens_b)
    reward_rejected_b = beta * _average_logps(policy_rejected_b, rejected_tokens_b)
    h_b = reward_chosen_b - reward_rejected_b - gamma
    loss_b = -(1 - label_smoothing) * jax.nn.log_sigmoid(h_b) - (
        label_smoothing * jax.nn.log_sigmoid(-h_b)
    )
    metrics = _reward_metrics(reward_chosen_b, reward_rejected_b, policy_chosen_b,
                              policy_rejected_b)
    return loss_b, metrics


def log1m_exp(x):
    """``log(1 - exp(x))`` for x < 0, accurate near 0 and for very negative x."""
    x = jnp.minimum(x, -1e-7)  # a probability of 1 would make the odds infinite
    return jnp.where(x > -0.6931, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(policy_chosen_b, policy_rejected_b, chosen_tokens_b, rejected_tokens_b, *,
              beta: float = 0.1):
    """Per-pair ORPO loss (Hong et al. 2024): no reference; the chosen response's negative
    log-likelihood per token plus ``beta`` (the paper's lambda) times the odds-ratio loss
    ``-log sigma(log odds(y_c) - log odds(y_r))``, with ``odds(y) = p / (1 - p)`` of the
    per-token average probability ``p = exp(logp / tokens)``."""
    avg_chosen_b = _average_logps(policy_chosen_b, chosen_tokens_b)
    avg_rejected_b = _average_logps(policy_rejected_b, rejected_tokens_b)
    log_odds_b = (avg_chosen_b - avg_rejected_b) - (
        log1m_exp(avg_chosen_b) - log1m_exp(avg_rejected_b)
    )
    odds_ratio_loss_b = -jax.nn.log_sigmoid(log_odds_b)
    nll_b = -avg_chosen_b
    loss_b = nll_b + beta * odds_ratio_loss_b
    metrics = _reward_metrics(beta * avg_chosen_b, beta * avg_rejected_b, policy_chosen_b,
                              policy_rejected_b)
    metrics.update({
        "nll_loss": jax.lax.stop_gradient(nll_b),
        "log_odds_ratio": jax.lax.stop_gradient(-odds_ratio_loss_b),
        "log_odds_chosen": jax.lax.stop_gradient(log_odds_b),
    })
    return loss_b, metrics


def kto_loss(policy_b, ref_b, label_b, kl, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Per-example KTO loss (Ethayarajh et al. 2024) from sequence log-probs [B] of the
    policy and the reference, labels [B] (1 desirable, 0 undesirable) and the reference
    point ``kl`` (a scalar: the batch's KL estimate, not differentiated, at least 0):
    ``w_D (1 - sigma(beta (r - kl)))`` for desirable examples and
    ``w_U (1 - sigma(beta (kl - r)))`` for undesirable ones, ``r = logp - ref``.
    Returns (loss_b, metrics_b) with the implicit reward ``beta r`` and whether its side of
    the reference point matches the label (``rewards/accuracy``)."""
    logratio_b = policy_b - ref_b
    kl = jax.lax.stop_gradient(kl)
    desirable_b = label_b.astype(jnp.float32)
    chosen_b = 1 - jax.nn.sigmoid(beta * (logratio_b - kl))
    rejected_b = 1 - jax.nn.sigmoid(beta * (kl - logratio_b))
    loss_b = (desirable_b * desirable_weight * chosen_b
              + (1 - desirable_b) * undesirable_weight * rejected_b)
    reward_b = beta * jax.lax.stop_gradient(logratio_b)
    right_side_b = jnp.where(desirable_b > 0, reward_b > beta * kl, reward_b < beta * kl)
    metrics = {
        "rewards/desirable": reward_b * desirable_b,
        "rewards/undesirable": reward_b * (1 - desirable_b),
        "rewards/accuracy": right_side_b.astype(jnp.float32),
        "logps": jax.lax.stop_gradient(policy_b),
    }
    return loss_b, metrics
