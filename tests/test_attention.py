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
