"""PPO's pure pieces against hand computation (plain Python loops and literal numbers)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.losses import (
    adaptive_kl_update,
    aggregate_token_loss,
    clipped_value_loss,
    explained_variance,
    fixed_kl_update,
    gae_advantages,
    token_rewards,
    whiten,
)

GAMMA, LAM = 0.9, 0.8
GARBAGE = 7.5  # what a critic or a buffer may hold on padding; must never leak in


def _gae_by_hand(rewards, values, mask, gamma, lam):
    """A_t = sum_k (gamma lam)^k delta_{t+k} over the row's valid tokens, V = 0 past the end
    (the closed form, not the backward recursion the implementation uses)."""
    advantages = np.zeros(np.shape(rewards))
    returns = np.zeros(np.shape(rewards))
    for b in range(len(rewards)):
        idx = [t for t in range(len(rewards[b])) if mask[b][t]]
        deltas = []
        for j, t in enumerate(idx):
            next_value = values[b][idx[j + 1]] if j + 1 < len(idx) else 0.0
            deltas.append(rewards[b][t] + gamma * next_value - values[b][t])
        for j, t in enumerate(idx):
            advantages[b][t] = sum((gamma * lam) ** k * deltas[j + k] for k in range(len(idx) - j))
            returns[b][t] = advantages[b][t] + values[b][t]
    return advantages, returns


def test_gae_rows_of_different_lengths_with_padding_and_an_empty_row():
    mask = [
        [1, 1, 1, 1, 1],  # full: the last token is the final position
        [1, 1, 0, 0, 0],  # trailing padding
        [0, 0, 0, 0, 0],  # empty
        [1, 1, 1, 0, 0],
    ]
    rewards = [
        [0.1, -0.2, 0.0, 0.3, 1.0],
        [0.5, 1.0, GARBAGE, GARBAGE, GARBAGE],
        [GARBAGE] * 5,
        [-0.1, 0.2, 2.0, GARBAGE, GARBAGE],
    ]
    values = [
        [0.3, 0.1, -0.4, 0.6, 0.2],
        [0.2, 0.4, GARBAGE, GARBAGE, GARBAGE],
        [GARBAGE] * 5,
        [0.5, -0.3, 0.9, GARBAGE, GARBAGE],
    ]
    adv, ret = gae_advantages(jnp.array(rewards), jnp.array(values), jnp.array(mask), GAMMA, LAM)
    adv, ret = np.asarray(adv), np.asarray(ret)

    # Row 1 written out: the last token bootstraps from V = 0, not from the padding's 7.5.
    delta1 = 1.0 + GAMMA * 0.0 - 0.4  # 0.6
    delta0 = 0.5 + GAMMA * 0.4 - 0.2  # 0.66
    np.testing.assert_allclose(adv[1], [delta0 + GAMMA * LAM * delta1, delta1, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(adv[1, :2], [1.092, 0.6], atol=1e-6)
    np.testing.assert_allclose(ret[1], [1.292, 1.0, 0, 0, 0], atol=1e-6)

    want_adv, want_ret = _gae_by_hand(rewards, values, mask, GAMMA, LAM)
    np.testing.assert_allclose(adv, want_adv, atol=1e-6)
    np.testing.assert_allclose(ret, want_ret, atol=1e-6)
    padding = np.asarray(mask) == 0
    assert np.all(adv[padding] == 0) and np.all(ret[padding] == 0)
    assert np.all(adv[2] == 0) and np.all(ret[2] == 0)


def test_gae_skips_a_hole_inside_a_row():
    # A masked token inside a row (e.g. a tool's output) is passed over: the row's GAE equals
    # that of its valid tokens alone.
    mask = [[1, 0, 1, 1, 0]]
    rewards = [[0.2, GARBAGE, -0.5, 1.0, GARBAGE]]
    values = [[0.1, GARBAGE, 0.3, 0.7, GARBAGE]]
    adv, ret = gae_advantages(jnp.array(rewards), jnp.array(values), jnp.array(mask), GAMMA, LAM)
    dense_adv, dense_ret = _gae_by_hand(
        [[0.2, -0.5, 1.0]], [[0.1, 0.3, 0.7]], [[1, 1, 1]], GAMMA, LAM
    )
    np.testing.assert_allclose(np.asarray(adv)[0, [0, 2, 3]], dense_adv[0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(ret)[0, [0, 2, 3]], dense_ret[0], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(adv)[0, [1, 4]], [0, 0])
    np.testing.assert_array_equal(np.asarray(ret)[0, [1, 4]], [0, 0])


def test_clipped_value_loss_branches_and_clip_fraction():
    c = 0.2
    # (v, v_old, R): v_clip = clip(v, v_old - 0.2, v_old + 0.2)
    cases = [
        (1.0, 0.5, 2.0),  # v_clip 0.7: (0.7-2)^2 = 1.69 > (1-2)^2 = 1     -> clipped wins
        (1.0, 0.5, 0.0),  # v_clip 0.7: 0.49 < 1                           -> unclipped
        (0.6, 0.5, 1.0),  # inside the range: both 0.16                    -> unclipped
        (0.0, 0.5, 1.0),  # v_clip 0.3: 0.49 < 1                           -> unclipped
        (0.0, 0.5, -1.0),  # v_clip 0.3: 1.69 > 1                          -> clipped wins
        (GARBAGE, 0.0, -GARBAGE),  # masked
    ]
    v, old, ret = (jnp.array([[case[i] for case in cases]]) for i in range(3))
    mask = jnp.array([[1, 1, 1, 1, 1, 0]])
    loss, clipped = clipped_value_loss(v, old, ret, mask, c)
    np.testing.assert_allclose(np.asarray(loss), [[0.845, 0.5, 0.08, 0.5, 0.845, 0.0]], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(clipped), [[1, 0, 0, 0, 1, 0]])
    num, den = aggregate_token_loss(clipped, mask, "dapo", 6)
    assert float(num / den) == pytest.approx(2 / 5)

    # Where the clipped branch wins, the value gets no gradient; elsewhere d/dv = v - R.
    grad = jax.grad(lambda v: jnp.sum(clipped_value_loss(v, old, ret, mask, c)[0]))(v)
    np.testing.assert_allclose(np.asarray(grad), [[0.0, 1.0, -0.4, -1.0, 0.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize(
    "observed_kl, expected",
    [
        (5.4, 0.1 * (1 - 0.1 * 0.512)),  # below target: e = 5.4/6 - 1 = -0.1
        (6.6, 0.1 * (1 + 0.1 * 0.512)),  # above target: e = +0.1
        (6.0, 0.1),  # on target
        (12.0, 0.1 * (1 + 0.2 * 0.512)),  # e = +1, clipped to +0.2
        (0.0, 0.1 * (1 - 0.2 * 0.512)),  # e = -1, clipped to -0.2
    ],
)
def test_adaptive_kl_controller(observed_kl, expected):
    # n_steps / horizon = 512 / 1000 = 0.512
    got = adaptive_kl_update(0.1, observed_kl, 512, target=6.0, horizon=1000)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    jitted = jax.jit(adaptive_kl_update)(jnp.float32(0.1), jnp.float32(observed_kl), 512, 6.0, 1000)
    assert float(jitted) == pytest.approx(expected, rel=1e-6)
    assert float(fixed_kl_update(0.1, observed_kl, 512, 6.0, 1000)) == pytest.approx(0.1)


LOGP = [
    [-1.0, -0.5, -2.0, -0.1],
    [-0.3, -1.2, GARBAGE, GARBAGE],
    [GARBAGE] * 4,
    [-0.7, GARBAGE, -0.2, GARBAGE],
]
REF = [
    [-1.2, -0.4, -1.5, -0.1],
    [-0.5, -1.0, 0.0, 0.0],
    [0.0] * 4,
    [-0.9, 0.0, -0.6, 0.0],
]
MASK = [
    [1, 1, 1, 1],  # the last valid token is the final position
    [1, 1, 0, 0],  # trailing padding
    [0, 0, 0, 0],  # empty: no token to take its score
    [1, 0, 1, 0],  # a hole, then padding
]
SCORES = [2.0, -1.0, 5.0, 3.0]
LAST_VALID = [3, 1, None, 2]


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_token_rewards_put_kl_on_every_token_and_the_score_on_the_last(estimator):
    kl_coef = 0.05
    rewards, kl = token_rewards(
        jnp.array(SCORES), jnp.array(LOGP), jnp.array(REF), jnp.array(MASK), kl_coef, estimator
    )
    want_kl = np.zeros((4, 4))
    want_rewards = np.zeros((4, 4))
    for b in range(4):
        for t in range(4):
            if not MASK[b][t]:
                continue
            if estimator == "k1":
                want_kl[b][t] = LOGP[b][t] - REF[b][t]
            else:
                r = REF[b][t] - LOGP[b][t]
                want_kl[b][t] = math.exp(r) - r - 1
            want_rewards[b][t] = -kl_coef * want_kl[b][t]
            if t == LAST_VALID[b]:
                want_rewards[b][t] += SCORES[b]
    np.testing.assert_allclose(np.asarray(kl), want_kl, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rewards), want_rewards, atol=1e-6)
    # Spelled out for row 0 with k1: kl = [0.2, -0.1, -0.5, 0], score 2.0 at t = 3.
    if estimator == "k1":
        np.testing.assert_allclose(np.asarray(rewards)[0], [-0.01, 0.005, 0.025, 2.0], atol=1e-6)
    # The score is paid exactly once per non-empty row, and nowhere for the empty one.
    np.testing.assert_allclose(
        np.asarray(rewards + kl_coef * kl).sum(-1), [2.0, -1.0, 0.0, 3.0], atol=1e-6
    )


def test_token_rewards_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="kl_estimator"):
        token_rewards(
            jnp.zeros(1), jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), 0.1, "k2"
        )


X = [[1.0, 2.0, 4.0], [-1.0, GARBAGE, GARBAGE], [GARBAGE] * 3]
X_MASK = [[1, 1, 1], [1, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_over_valid_tokens_only(shift_mean):
    got = np.asarray(whiten(jnp.array(X), jnp.array(X_MASK), shift_mean))
    valid = [X[b][t] for b in range(3) for t in range(3) if X_MASK[b][t]]  # 1, 2, 4, -1
    mean = sum(valid) / len(valid)  # 1.5
    var = sum((x - mean) ** 2 for x in valid) / len(valid)  # (0.25+0.25+6.25+6.25)/4 = 3.25
    assert (mean, var) == (1.5, 3.25)
    want = np.zeros((3, 3))
    for b in range(3):
        for t in range(3):
            if X_MASK[b][t]:
                want[b][t] = (X[b][t] - mean) / math.sqrt(var + 1e-8) + (0 if shift_mean else mean)
    np.testing.assert_allclose(got, want, atol=1e-6)
    valid_mask = np.asarray(X_MASK) == 1
    assert np.all(got[~valid_mask] == 0)
    centred = got[valid_mask] - (0 if shift_mean else mean)
    assert abs(centred.mean()) < 1e-6
    assert centred.var() == pytest.approx(1.0, abs=1e-5)


def test_whiten_an_all_padding_batch_is_zero():
    got = whiten(jnp.full((2, 3), GARBAGE), jnp.zeros((2, 3)))
    assert np.all(np.asarray(got) == 0)


def test_explained_variance_by_hand():
    # Valid returns 1, 2, 3, 4 (mean 2.5, var 1.25); residuals R - V = 0, 0, 1, -1 (var 0.5).
    returns = jnp.array([[1.0, 2.0, GARBAGE], [3.0, 4.0, GARBAGE]])
    values = jnp.array([[1.0, 2.0, -GARBAGE], [2.0, 5.0, 0.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 0]])
    assert float(explained_variance(values, returns, mask)) == pytest.approx(1 - 0.5 / 1.25)
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    constant = jnp.array([[2.0, 2.0, GARBAGE], [2.0, 2.0, GARBAGE]])
    assert math.isnan(float(explained_variance(values, constant, mask)))


def test_every_piece_jits_and_matches_eager():
    mask = jnp.array(MASK)
    logp, ref, scores = jnp.array(LOGP), jnp.array(REF), jnp.array(SCORES)
    values = jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)
    pairs = [
        (
            jax.jit(token_rewards, static_argnames="kl_estimator"),
            token_rewards,
            (scores, logp, ref, mask, jnp.float32(0.05)),
            {"kl_estimator": "k3"},
        ),
        (
            jax.jit(gae_advantages),
            gae_advantages,
            (logp, values, mask, jnp.float32(GAMMA), jnp.float32(LAM)),
            {},
        ),
        (
            jax.jit(whiten, static_argnames="shift_mean"),
            whiten,
            (logp, mask),
            {"shift_mean": False},
        ),
        (
            jax.jit(clipped_value_loss),
            clipped_value_loss,
            (values, values * 0.5, ref, mask, jnp.float32(0.2)),
            {},
        ),
        (jax.jit(explained_variance), explained_variance, (values, ref, mask), {}),
        (jax.jit(fixed_kl_update), fixed_kl_update, (jnp.float32(0.1),), {}),
    ]
    for jitted, eager, args, kwargs in pairs:
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
            jitted(*args, **kwargs),
            eager(*args, **kwargs),
        )
