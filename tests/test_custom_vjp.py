"""The hand-written backward passes of the MLP's SwiGLU and the einsum attention core give
autodiff's gradients of the plain formulas (and the same forward values)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.models.layers import attention_mask, grouped_attention, swiglu


def _plain_attention(q_btnh, k_bskh, v_bskh, mask_b1ts):
    b, t, n, h = q_btnh.shape
    kv = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh).astype(jnp.float32) * h**-0.5
    scores = jnp.where(mask_b1ts[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh).reshape(b, t, n, h)


def _grads(f, args, dy):
    return jax.value_and_grad(lambda *a: jnp.sum(f(*a) * dy), argnums=range(len(args)))(*args)


def test_swiglu_gradients_are_autodiffs():
    rng = np.random.default_rng(0)
    gate, up, dh = (jnp.asarray(rng.normal(size=(2, 5, 12)) * 3, jnp.float32) for _ in range(3))
    ours = _grads(swiglu, (gate, up), dh)
    plain = _grads(lambda g, u: jax.nn.silu(g) * u, (gate, up), dh)
    np.testing.assert_array_equal(swiglu(gate, up), jax.nn.silu(gate) * up)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(4, 2, None), (4, 1, 3), (2, 2, None)])
def test_attention_gradients_are_autodiffs(heads, kv_heads, window):
    """Two packed documents, left padding (rows whose every key is masked) and a sliding
    window, with query groups sharing a kv head."""
    b, t, h = 2, 9, 8
    rng = np.random.default_rng(1)
    q, dy = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv_heads, h)), jnp.float32) for _ in range(2))
    segment_bt = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1, 0, 0]])
    positions_bt = jnp.asarray([[0, 0, 0, 1, 2, 0, 1, 2, 3], list(range(7)) + [0, 0]])
    slot_t = jnp.arange(t)
    mask = attention_mask(segment_bt, slot_t, positions_bt, segment_bt, slot_t, positions_bt,
                          window)
    assert not bool(jnp.all(jnp.any(mask.dense, axis=-1)))  # some rows are fully masked
    ours = _grads(lambda q, k, v: grouped_attention(q, k, v, mask), (q, k, v), dy)
    plain = _grads(lambda q, k, v: _plain_attention(q, k, v, mask.dense), (q, k, v), dy)
    np.testing.assert_array_equal(grouped_attention(q, k, v, mask),
                                  _plain_attention(q, k, v, mask.dense))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
        assert a.shape == b.shape and not np.any(np.isnan(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backward_keeps_no_square_tensor(dtype):
    """What the backward keeps per call: no [B, H, T, S] probabilities, and for the MLP
    only its two inputs."""
    b, t, n, h = 1, 64, 2, 4
    q = jnp.ones((b, t, n, h), dtype)
    mask = jnp.ones((b, 1, t, t), bool)
    _, vjp = jax.vjp(lambda q, k, v: grouped_attention(q, k, v, mask), q, q, q)
    floats = [x.shape for x in jax.tree.leaves(vjp) if jnp.issubdtype(x.dtype, jnp.inexact)]
    assert floats and not any(s[-2:] == (t, t) for s in floats), floats
    _, vjp = jax.vjp(swiglu, q, q)
    assert len([x for x in jax.tree.leaves(vjp) if getattr(x, "shape", None) == q.shape]) == 2
