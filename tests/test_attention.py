"""The attention implementations agree (the CPU einsum path and jax.nn's XLA path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.models.layers import attend, attention_mask


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_einsum_attention_matches_xla_with_packing_and_padding(heads, kv_heads):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    b, t, h = 2, 9, 8
    q = jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv_heads, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv_heads, h)), jnp.float32)
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1] * 9], jnp.int32)
    positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0, 0], list(range(9))], jnp.int32)
    slots = jnp.arange(t, dtype=jnp.int32)
    for window in (None, 3):
        mask = attention_mask(segments, slots, positions, segments, slots, positions, window)
        einsum = attend(q, k, v, mask, "einsum")
        xla = attend(q, k, v, mask, "xla")
        real = np.asarray(segments)[:, :, None, None] != 0
        np.testing.assert_allclose(
            np.where(real, np.asarray(einsum), 0), np.where(real, np.asarray(xla), 0), atol=1e-5
        )
    grads = [
        jax.grad(lambda q_, impl=impl: attend(q_, k, v, mask, impl).sum())(q)
        for impl in ("einsum", "xla")
    ]
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), atol=1e-5)


@pytest.mark.parametrize("filled", [1, 127, 128, 300, 512])
def test_length_aware_decode_attention_matches_the_whole_cache(filled):
    """Decoding reads only the written blocks of the cache; the answer is the same as
    attending over the whole (masked) cache, for left-padded rows too."""
    from jaxpt.models.layers import DECODE_BLOCK, decode_attention

    b, k, g, s, h = 3, 2, 3, 4 * DECODE_BLOCK, 16
    rng = np.random.default_rng(filled)
    q = jnp.asarray(rng.normal(size=(b, 1, k * g, h)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(b, k, h, s)) * 3, jnp.float32)
    values = jnp.asarray(rng.normal(size=(b, k, s, h)), jnp.float32)
    # Row r's prompt starts at slot `pad[r]`; slots at or after `filled` were never written.
    pad = np.minimum([0, 5, filled - 1], filled - 1)
    slots = np.arange(s)
    mask = jnp.asarray((slots[None] >= pad[:, None]) & (slots[None] < filled))[:, None, None]
    whole = decode_attention(q, keys, values, mask)  # no `filled`: every slot is read
    blocked = jax.jit(decode_attention)(q, keys, values, mask, jnp.int32(filled))
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=2e-5, atol=2e-6)
    # Against a direct float64 computation.
    qn, kn, vn, mn = (np.asarray(x, np.float64) for x in (q, keys, values, mask))
    for r in range(b):
        for head in range(k * g):
            scores = qn[r, 0, head] @ kn[r, head // g] / np.sqrt(h)
            scores = np.where(mn[r, 0, 0], scores, -np.inf)
            weights = np.exp(scores - scores.max())
            expected = weights @ vn[r, head // g] / weights.sum()
            np.testing.assert_allclose(np.asarray(blocked)[r, 0, head], expected, atol=1e-5)
