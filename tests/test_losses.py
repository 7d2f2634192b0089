"""Loss values against hand computation (plain numpy / math, independent of jaxpt)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.losses import (
    aggregate_token_loss,
    bradley_terry_loss,
    dpo_loss,
    estimate_advantages,
    group_advantages,
    importance_weights,
    k3_kl,
    policy_gradient_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_logprob,
    token_logprobs,
)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_token_logprobs_and_sequence_sum_match_log_softmax():
    logits = np.array([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]], np.float32)
    targets = np.array([[1, 2]])
    got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(targets)))
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(got, [[log_softmax[0, 0, 1], log_softmax[0, 1, 2]]], rtol=1e-6)
    masked = sequence_logprob(jnp.asarray(got), jnp.asarray([[0.0, 1.0]]))
    np.testing.assert_allclose(np.asarray(masked), [log_softmax[0, 1, 2]], rtol=1e-6)


def test_bradley_terry_loss_with_margin_and_centering():
    r_c, r_r, margin = jnp.array([2.0, -1.0]), jnp.array([0.5, 1.0]), jnp.array([0.5, 0.0])
    loss, metrics = bradley_terry_loss(r_c, r_r, margin, center_coef=0.01)
    expected = [
        -math.log(_sigmoid(2.0 - 0.5 - 0.5)) + 0.01 * 2.5**2,
        -math.log(_sigmoid(-1.0 - 1.0)) + 0.01 * 0.0**2,
    ]
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(metrics["accuracy"]), [1.0, 0.0])
    np.testing.assert_allclose(np.asarray(metrics["margin"]), [1.5, -2.0])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_by_hand(loss_type):
    pc, pr, rc, rr = -3.0, -5.0, -3.5, -4.0
    beta, ls = 0.1, 0.2 if loss_type == "sigmoid" else 0.0
    loss, m = dpo_loss(
        jnp.array([pc]), jnp.array([pr]), jnp.array([rc]), jnp.array([rr]),
        beta=beta, loss_type=loss_type, label_smoothing=ls,
    )
    h = (pc - pr) - (rc - rr)  # 1.5
    expected = {
        "sigmoid": -(1 - ls) * math.log(_sigmoid(beta * h)) - ls * math.log(_sigmoid(-beta * h)),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": max(0.0, 1 - beta * h),
    }[loss_type]
    np.testing.assert_allclose(float(loss[0]), expected, rtol=1e-6)
    np.testing.assert_allclose(float(m["rewards/chosen"][0]), beta * (pc - rc), rtol=1e-6)
    np.testing.assert_allclose(float(m["rewards/rejected"][0]), beta * (pr - rr), rtol=1e-6)
    np.testing.assert_allclose(float(m["rewards/margins"][0]), beta * h, rtol=1e-6)
    assert float(m["rewards/accuracy"][0]) == 1.0


def test_dpo_rejects_unknown_loss_type():
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), loss_type="robust")


def test_group_advantages_by_hand_and_all_equal_group():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 0.0, 0.0, 0.0]])
    adv, spread = group_advantages(jnp.asarray(rewards), eps=1e-4)
    for row, a in zip(rewards, np.asarray(adv)):
        std = np.std(row, ddof=1)
        np.testing.assert_allclose(a, (row - row.mean()) / (std + 1e-4), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(adv)[1], 0.0)
    np.testing.assert_array_equal(np.asarray(spread), [True, False, True])
    unscaled, _ = group_advantages(jnp.asarray(rewards), scale_by_std=False)
    np.testing.assert_allclose(np.asarray(unscaled), rewards - rewards.mean(1, keepdims=True))


ADV_REWARDS = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 0.0, 0.0, 0.0]])


def test_rloo_advantages_by_hand():
    adv, spread = rloo_advantages(jnp.asarray(ADV_REWARDS))
    # r_i minus the mean of the other three: row 0 sums to 2, row 2 to 3.
    expected = [[1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3],
                [0.0, 0.0, 0.0, 0.0],
                [3 - 0 / 3, 0 - 3 / 3, 0 - 3 / 3, 0 - 3 / 3]]
    np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(spread), [True, False, True])
    with pytest.raises(ValueError, match="needs >= 2 completions"):
        rloo_advantages(jnp.ones((3, 1)))


def test_reinforce_pp_advantages_by_hand():
    adv, spread = reinforce_pp_advantages(jnp.asarray(ADV_REWARDS), eps=1e-4)
    # Group means 0.5, 0.5, 0.75 off; the centred values have batch mean 0 and population
    # variance (4 * 0.25 + 2.25**2 + 3 * 0.75**2) / 12 = 31 / 48.
    centred = [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [2.25, -0.75, -0.75, -0.75]]
    np.testing.assert_allclose(
        np.asarray(adv), np.array(centred) / (math.sqrt(31 / 48) + 1e-4), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(spread), [True, False, True])

    # Token-count weights (0 drops a completion), as OpenRLHF and verl whiten over tokens.
    weights = [[3, 1, 1, 0], [2, 2, 2, 2], [1, 1, 1, 5]]
    values, counts = [], []
    for row, w_row in zip(centred, weights):
        for c, w in zip(row, w_row):
            values.append(c)
            counts.append(w)
    total = sum(counts)
    mean = sum(c * w for c, w in zip(values, counts)) / total
    std = math.sqrt(sum(w * (c - mean) ** 2 for c, w in zip(values, counts)) / total)
    expected = [[(c - mean) / (std + 1e-4) for c in row] for row in centred]
    adv_w, _ = reinforce_pp_advantages(jnp.asarray(ADV_REWARDS), weights_pg=jnp.asarray(weights))
    np.testing.assert_allclose(np.asarray(adv_w), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_all_equal_rewards_give_zero_advantages(estimator):
    rewards = jnp.full((3, 4), 0.7)
    for weights in (None, jnp.zeros((3, 4))):  # zero weights: every completion dropped
        adv, spread = estimate_advantages(rewards, estimator, weights_pg=weights)
        np.testing.assert_array_equal(np.asarray(adv), 0.0)
        assert not np.asarray(spread).any()
    # The has-spread mask (dynamic sampling's filter) is the same for every estimator.
    _, spread = estimate_advantages(jnp.asarray(ADV_REWARDS), estimator)
    np.testing.assert_array_equal(np.asarray(spread), [True, False, True])


def test_unknown_advantage_estimator_is_rejected():
    with pytest.raises(ValueError, match="reinforce_pp"):
        estimate_advantages(jnp.zeros((1, 2)), "gae")


def test_k3_kl_by_hand_and_nonnegative():
    logp, ref = np.array([-1.0, -2.0, -0.5]), np.array([-1.5, -1.0, -0.5])
    got = np.asarray(k3_kl(jnp.asarray(logp), jnp.asarray(ref)))
    r = ref - logp
    np.testing.assert_allclose(got, np.exp(r) - r - 1, rtol=1e-6)
    assert (got >= 0).all() and got[2] == 0.0


def _pg_by_hand(logp, old, adv, eps_low, eps_high):
    ratio = np.exp(logp - old)
    return -np.minimum(ratio * adv, np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)


def test_policy_gradient_clips_at_both_bounds():
    # ratios: e^0.5 (above 1+eps_high), e^-0.5 (below 1-eps_low), 1.0 (inside)
    logp = np.array([[0.5, -0.5, 0.0]], np.float32)
    old = np.zeros_like(logp)
    mask = np.ones_like(logp)
    for adv in (1.0, -1.0):
        loss, m = policy_gradient_loss(
            jnp.asarray(logp), jnp.asarray(old), jnp.array([adv]), jnp.asarray(mask),
            epsilon_low=0.2, epsilon_high=0.28,
        )
        expected = _pg_by_hand(logp, old, adv, 0.2, 0.28)
        np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-6)
        if adv > 0:  # the upside is capped at 1 + eps_high
            np.testing.assert_allclose(float(loss[0, 0]), -1.28, rtol=1e-6)
            np.testing.assert_array_equal(np.asarray(m["clip_high"]), [[1.0, 0.0, 0.0]])
        else:  # the downside is capped at 1 - eps_low
            np.testing.assert_allclose(float(loss[0, 1]), 0.8, rtol=1e-6)
            np.testing.assert_array_equal(np.asarray(m["clip_low"]), [[0.0, 1.0, 0.0]])
    # Clipped tokens pass no gradient; unclipped ones do.
    grad = jax.grad(
        lambda lp: policy_gradient_loss(lp, jnp.asarray(old), jnp.array([1.0]), jnp.asarray(mask),
                                        epsilon_low=0.2, epsilon_high=0.28)[0].sum()
    )(jnp.asarray(logp))
    np.testing.assert_allclose(np.asarray(grad), [[0.0, -math.exp(-0.5), -1.0]], rtol=1e-6)


def test_policy_gradient_with_k3_kl_term():
    logp, old, ref = jnp.array([[-1.0, -2.0]]), jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -1.0]])
    loss, m = policy_gradient_loss(logp, old, jnp.array([0.5]), jnp.ones((1, 2)),
                                   ref_logp_bt=ref, beta=0.04)
    r = np.array([-0.5, 1.0])
    np.testing.assert_allclose(np.asarray(loss)[0], -0.5 + 0.04 * (np.exp(r) - r - 1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["kl"])[0], np.exp(r) - r - 1, rtol=1e-6)


def test_sequence_level_ratio_is_gspo():
    logp = np.array([[0.1, 0.3, 9.0], [-0.2, 0.0, 0.0]], np.float32)
    old = np.zeros_like(logp)
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
    adv = np.array([1.0, -1.0], np.float32)
    loss, _ = policy_gradient_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                                   jnp.asarray(mask), importance_level="sequence",
                                   epsilon_low=0.2, epsilon_high=0.2)
    seq_ratio = np.exp((logp * mask).sum(1) / mask.sum(1))  # e^0.2, e^-0.0667
    expected = -np.minimum(seq_ratio * adv, np.clip(seq_ratio, 0.8, 1.2) * adv)
    np.testing.assert_allclose(np.asarray(loss) * mask, expected[:, None] * mask, rtol=1e-6)


def test_aggregation_by_hand_for_each_loss_type():
    loss = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
    cases = {
        "grpo": ((6 / 3 + 4 / 1) / 2),
        "dr_grpo": ((6 + 4) / 4 / 2),
        "dapo": ((6 + 4) / 4),
    }
    for loss_type, expected in cases.items():
        num, den = aggregate_token_loss(jnp.asarray(loss), jnp.asarray(mask), loss_type, 4)
        np.testing.assert_allclose(float(num / den), expected, rtol=1e-6)
    # Split into two micro-batches: numerators and denominators add up to the full batch.
    for loss_type in cases:
        parts = [aggregate_token_loss(jnp.asarray(loss[i : i + 1]), jnp.asarray(mask[i : i + 1]),
                                      loss_type, 4) for i in range(2)]
        full = aggregate_token_loss(jnp.asarray(loss), jnp.asarray(mask), loss_type, 4)
        np.testing.assert_allclose(float(sum(p[0] for p in parts)), float(full[0]), rtol=1e-6)
        np.testing.assert_allclose(float(sum(p[1] for p in parts)), float(full[1]), rtol=1e-6)
    with pytest.raises(ValueError, match="bnpo2"):
        aggregate_token_loss(jnp.asarray(loss), jnp.asarray(mask), "bnpo2", 4)


def test_cispo_weighs_every_tokens_gradient_by_its_clipped_ratio():
    # ratios e^0.5 (above 1 + 0.28), e^-0.5 (below 1 - 0.2), 1: clipped weights 1.28, 0.8, 1.
    logp = jnp.array([[0.5, -0.5, 0.0]])
    old, mask = jnp.zeros((1, 3)), jnp.ones((1, 3))

    def loss(lp, adv):
        return policy_gradient_loss(lp, old, jnp.array([adv]), mask, epsilon_low=0.2,
                                    epsilon_high=0.28, objective="cispo")

    values, m = loss(logp, 1.0)
    np.testing.assert_allclose(np.asarray(values), [[-0.64, 0.4, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m["clip_high"]), [[1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(m["clip_low"]), [[0.0, 1.0, 0.0]])
    # Unlike the clipped surrogate, a clipped token still passes a gradient: -w A.
    for adv in (1.0, -2.0):
        grad = jax.grad(lambda lp, a=adv: loss(lp, a)[0].sum())(logp)
        np.testing.assert_allclose(np.asarray(grad), [[-1.28 * adv, -0.8 * adv, -adv]],
                                   rtol=1e-6)
    with pytest.raises(ValueError, match="objective"):
        policy_gradient_loss(logp, old, jnp.array([1.0]), mask, objective="reinforce")
    # CISPO's token losses reduce as DAPO's: a mean over all the batch's tokens.
    per_token = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    token_mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate_token_loss(per_token, token_mask, "cispo", 4) == aggregate_token_loss(
        per_token, token_mask, "dapo", 4)


@pytest.mark.parametrize("correction", ["tis", "mis"])
def test_importance_weights_truncate_or_mask_at_the_cap(correction):
    trainer = jnp.zeros((1, 4))
    sampler = jnp.array([[0.0, -1.0, 1.0, 5.0]])  # w = exp(trainer - sampler): 1, e, 1/e
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # the last position is no generated token
    weights, m = importance_weights(trainer, sampler, mask, correction, cap=2.0)
    e = math.e
    expected = [1.0, 2.0, 1 / e, 1.0] if correction == "tis" else [1.0, 0.0, 1 / e, 1.0]
    np.testing.assert_allclose(np.asarray(weights)[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m["is_capped"])[0], [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(np.asarray(m["is_weight"])[0], [1.0, e, 1 / e, 1.0], rtol=1e-6)
    # k3 of KL(sampler || trainer) on the sampler's tokens: r = trainer - sampler.
    np.testing.assert_allclose(np.asarray(m["mismatch_kl"])[0],
                               [0.0, e - 1 - 1, 1 / e + 1 - 1, 0.0], rtol=1e-6)
    # The weights scale each token's loss and pass no gradient themselves.
    logp = jnp.array([[0.1, -0.1, 0.0, 0.0]])
    plain, _ = policy_gradient_loss(logp, trainer, jnp.array([1.0]), mask)
    weighted, _ = policy_gradient_loss(logp, trainer, jnp.array([1.0]), mask, weights_bt=weights)
    np.testing.assert_allclose(np.asarray(weighted), np.asarray(plain) * np.asarray(weights),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="importance correction"):
        importance_weights(trainer, sampler, mask, "none", cap=2.0)
