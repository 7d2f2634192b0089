"""PPO for RLHF: the pure pieces between a scored rollout and the clipped losses.

As in InstructGPT (Ouyang et al. 2022, arXiv:2203.02155) and Ziegler et al. 2019
(arXiv:1909.08593), and as TRL's original ``PPOTrainer``, OpenRLHF and verl build it:

1. ``token_rewards``: the KL penalty goes into the reward, ``-kl_coef * kl_t`` on every
   completion token, and the reward model's sequence score is added at the last one;
2. ``gae_advantages``: per-token advantages and returns from those rewards and the critic's
   values (GAE, Schulman et al. 2015, arXiv:1506.02438);
3. ``whiten`` the advantages over the batch's valid tokens;
4. the policy loss is the clipped-ratio surrogate of ``policy.policy_gradient_loss``, fed
   per-token advantages (it takes [B] today); ``clipped_value_loss`` trains the critic;
5. ``adaptive_kl_update`` moves ``kl_coef`` towards a target KL between rollouts.

Arrays are [B, T] over the completion tokens; ``mask_bt`` (float or bool) is 1 on the
tokens that were generated and are trained on. All functions are pure and jittable; they
run on rollout data, so nothing here needs a gradient except ``clipped_value_loss``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpt.losses.policy import k3_kl

KL_ESTIMATORS = ("k1", "k3")


def token_rewards(score_b, logp_bt, ref_logp_bt, mask_bt, kl_coef, kl_estimator: str = "k1"):
    """Per-token rewards [B, T] with the KL penalty in the reward, and the per-token KL [B, T].

    ``rewards[b, t] = -kl_coef * kl[b, t] + score[b] * [t is the last valid token of row b]``
    on valid tokens, 0 elsewhere. ``kl`` is, per token, with ``logp`` the rollout policy's
    log-prob and ``ref_logp`` the reference's:

    k1: ``logp - ref_logp`` (TRL's PPOTrainer ``kl_penalty="kl"``, OpenRLHF's and verl's
        default); unbiased for KL(pi || ref) in expectation but negative on some tokens;
    k3: ``exp(r) - r - 1`` with ``r = ref_logp - logp`` (``policy.k3_kl``), >= 0 per token.

    The last valid token is the last position where ``mask_bt`` is set, so a row may carry
    trailing padding (or holes before it). An empty row gets no score: it has no token to
    hold it, and no token trains on it. ``kl_coef`` may be a traced scalar (an adaptive
    controller's state). ``kl`` is 0 on masked positions; ``-kl_coef * kl`` summed over
    tokens is the "non-score reward" metric.
    """
    valid_bt = mask_bt > 0
    logp_bt = logp_bt.astype(jnp.float32)
    ref_logp_bt = ref_logp_bt.astype(jnp.float32)
    if kl_estimator == "k1":
        kl_bt = logp_bt - ref_logp_bt
    elif kl_estimator == "k3":
        kl_bt = k3_kl(logp_bt, ref_logp_bt)
    else:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose from {KL_ESTIMATORS}")
    kl_bt = jnp.where(valid_bt, kl_bt, 0.0)
    # Valid tokens at or after t: exactly 1 at the row's last valid token (and only there).
    remaining_bt = jnp.flip(jnp.cumsum(jnp.flip(valid_bt.astype(jnp.int32), -1), -1), -1)
    is_last_bt = valid_bt & (remaining_bt == 1)
    score_b1 = score_b.astype(jnp.float32)[:, None]
    rewards_bt = -jnp.asarray(kl_coef, jnp.float32) * kl_bt + jnp.where(is_last_bt, score_b1, 0.0)
    return rewards_bt, kl_bt


def gae_advantages(rewards_bt, values_bt, mask_bt, gamma, lam):
    """Generalized Advantage Estimation: advantages [B, T] and returns [B, T].

    Backwards over the valid tokens of each row,

        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next
        R_t     = A_t + V_t

    where ``V_next``/``A_next`` are those of the next *valid* token of the row, and 0 after
    its last valid token: the completion ends there (EOS or the length limit), so nothing
    is bootstrapped past it and padding never leaks a value in. Masked positions are
    skipped, not treated as zero-reward steps: with trailing padding only (the usual
    rollout) this equals zeroing rewards and values on padding and running GAE over the
    full width (TRL's PPOTrainer); a hole inside a row (e.g. a tool's output in a
    multi-turn completion) is passed over, as verl does. A completion cut at the length
    limit is also treated as terminal, as TRL, OpenRLHF and verl do for RLHF. Advantages and
    returns are 0 on masked positions (and on empty rows).

    ``gamma`` and ``lam`` may be Python floats or traced scalars (RLHF commonly uses
    gamma = 1, lam = 0.95).
    """
    valid_tb = (mask_bt > 0).T  # scan runs over the leading axis: time
    rewards_tb = rewards_bt.astype(jnp.float32).T
    values_tb = values_bt.astype(jnp.float32).T

    def step(carry, xs):
        next_value_b, next_adv_b = carry
        reward_b, value_b, valid_b = xs
        delta_b = reward_b + gamma * next_value_b - value_b
        adv_b = delta_b + gamma * lam * next_adv_b
        # A masked position hands the next valid token's value and advantage on unchanged.
        carry = (jnp.where(valid_b, value_b, next_value_b), jnp.where(valid_b, adv_b, next_adv_b))
        return carry, jnp.where(valid_b, adv_b, 0.0)

    zeros_b = jnp.zeros(rewards_tb.shape[1], jnp.float32)
    _, advantages_tb = jax.lax.scan(
        step, (zeros_b, zeros_b), (rewards_tb, values_tb, valid_tb), reverse=True
    )
    advantages_bt = advantages_tb.T
    returns_bt = jnp.where(valid_tb.T, advantages_bt + values_bt.astype(jnp.float32), 0.0)
    return advantages_bt, returns_bt


def _masked_mean_var(x_bt, valid_bt):
    """Mean and population variance of ``x`` over the valid entries (0, 0 if there are none)."""
    count = jnp.maximum(jnp.sum(valid_bt.astype(jnp.float32)), 1.0)
    x_bt = jnp.where(valid_bt, x_bt.astype(jnp.float32), 0.0)  # padding may hold anything
    mean = jnp.sum(x_bt) / count
    var = jnp.sum(jnp.where(valid_bt, (x_bt - mean) ** 2, 0.0)) / count
    return mean, var


def whiten(x_bt, mask_bt, shift_mean: bool = True, *, eps: float = 1e-8):
    """``(x - mean) / sqrt(var + eps)`` with mean and variance over the valid tokens of the
    whole batch; 0 on masked positions.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as TRL's
    ``whiten_rewards`` does for rewards before GAE. The variance is the population one (as
    OpenRLHF's advantage normalisation and ``policy.reinforce_pp_advantages``); TRL and
    verl use the unbiased one, which differs by n / (n - 1) over n valid tokens. A batch
    with no valid token gives zeros.
    """
    valid_bt = mask_bt > 0
    mean, var = _masked_mean_var(x_bt, valid_bt)
    whitened_bt = (x_bt.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened_bt = whitened_bt + mean
    return jnp.where(valid_bt, whitened_bt, 0.0)


def clipped_value_loss(values_bt, old_values_bt, returns_bt, mask_bt, cliprange_value: float):
    """PPO's clipped value loss per token [B, T] and its clip indicator [B, T].

    ``v_clip = clip(v, v_old - c, v_old + c)``;
    ``loss = 0.5 * max((v - R)^2, (v_clip - R)^2)``, as TRL's PPOTrainer, OpenRLHF and
    verl. The indicator is 1 where the clipped term is strictly larger (it is the one taken,
    and gives no gradient); its masked mean is TRL's and verl's ``vf_clipfrac``. Both are 0
    on masked positions; aggregate with ``policy.aggregate_token_loss``.
    """
    valid_bt = mask_bt > 0
    values_bt = values_bt.astype(jnp.float32)
    old_values_bt = old_values_bt.astype(jnp.float32)
    returns_bt = returns_bt.astype(jnp.float32)
    clipped_values_bt = jnp.clip(
        values_bt, old_values_bt - cliprange_value, old_values_bt + cliprange_value
    )
    unclipped_loss_bt = (values_bt - returns_bt) ** 2
    clipped_loss_bt = (clipped_values_bt - returns_bt) ** 2
    loss_bt = 0.5 * jnp.maximum(unclipped_loss_bt, clipped_loss_bt)
    clipped_bt = (clipped_loss_bt > unclipped_loss_bt) & valid_bt
    return jnp.where(valid_bt, loss_bt, 0.0), clipped_bt.astype(jnp.float32)


def adaptive_kl_update(kl_coef, observed_kl, n_steps, target, horizon):
    """Ziegler et al. 2019's adaptive KL controller: the next ``kl_coef``.

    ``e = clip(observed_kl / target - 1, -0.2, 0.2)``; ``kl_coef * (1 + e * n_steps /
    horizon)``. ``observed_kl`` is the rollout's mean KL per sequence (summed over its
    tokens), ``n_steps`` how many samples the update covers (TRL passes the batch size),
    ``horizon`` how many samples a full +-20% correction is spread over (TRL: 10000).
    Pure over scalars, so ``kl_coef`` can live in the train state.
    """
    proportional_error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1, -0.2, 0.2)
    return jnp.asarray(kl_coef, jnp.float32) * (1 + proportional_error * n_steps / horizon)


def fixed_kl_update(kl_coef, observed_kl=None, n_steps=None, target=None, horizon=None):
    """The fixed controller: ``kl_coef`` unchanged (same signature as ``adaptive_kl_update``)."""
    del observed_kl, n_steps, target, horizon
    return jnp.asarray(kl_coef, jnp.float32)


KL_CONTROLLERS = {"fixed": fixed_kl_update, "adaptive": adaptive_kl_update}


def explained_variance(values_bt, returns_bt, mask_bt):
    """``1 - Var[R - V] / Var[R]`` over the valid tokens: 1 for a perfect critic, 0 for one
    no better than the mean return, negative for worse. NaN when the returns do not vary
    (undefined, as in Stable-Baselines3's ``explained_variance``)."""
    valid_bt = mask_bt > 0
    returns_bt = returns_bt.astype(jnp.float32)
    _, var_returns = _masked_mean_var(returns_bt, valid_bt)
    _, var_residual = _masked_mean_var(returns_bt - values_bt.astype(jnp.float32), valid_bt)
    varies = var_returns > 0
    return jnp.where(varies, 1 - var_residual / jnp.where(varies, var_returns, 1.0), jnp.nan)
