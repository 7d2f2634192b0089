"""The sampler's feature-major decode step against the model's own cached forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.models import init_model
from jaxpt.models.decode import decode_step
from jaxpt.models.decoder import KVCache
from jaxpt.models.lora import LoRASpec, adapted, add_adapters

BASE = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.2,
}
VARIANTS = {
    "llama": {"model_type": "llama", "tie_word_embeddings": False},
    "llama-tied": {"model_type": "llama", "tie_word_embeddings": True},
    "qwen2-bias": {"model_type": "qwen2", "tie_word_embeddings": False},
    "qwen3-qk-norm": {"model_type": "qwen3", "head_dim": 16, "tie_word_embeddings": True},
    "mistral-window": {"model_type": "mistral", "sliding_window": 4, "tie_word_embeddings": False},
}


def _prefilled(model, rows=3, prompt=5, slots=16):
    """A cache after a left-padded prompt batch, and the next tokens and positions."""
    rng = np.random.default_rng(0)
    ids_bt = jnp.asarray(rng.integers(1, model.config.vocab_size, (rows, prompt)), jnp.int32)
    mask_bt = jnp.asarray(np.arange(prompt)[None, :] >= np.array([[0], [2], [4]])[:rows], jnp.int32)
    positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=1) - 1, 0)
    cache = KVCache.init(model.config, rows, slots, model.dtype)
    _, cache = model(ids_bt, positions_bt, mask_bt, cache=cache)
    next_b = jnp.asarray(rng.integers(1, model.config.vocab_size, rows), jnp.int32)
    return cache, next_b, jnp.sum(mask_bt, axis=1)


def _compare(model, steps=3):
    cache, token_b, position_b = _prefilled(model)
    ref_cache = cache
    for _ in range(steps):
        logits_vb, cache = jax.jit(decode_step)(model, token_b, position_b, cache)
        ref_b1v, ref_cache = model(
            token_b[:, None], position_b[:, None], jnp.ones_like(token_b)[:, None], cache=ref_cache
        )
        np.testing.assert_allclose(
            np.asarray(logits_vb), np.asarray(ref_b1v[:, 0, :]).T, rtol=1e-5, atol=1e-5
        )
        for new, ref in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
            np.testing.assert_allclose(np.asarray(new), np.asarray(ref), rtol=1e-5, atol=1e-6)
        assert int(cache.index) == int(ref_cache.index)
        np.testing.assert_array_equal(np.asarray(cache.positions), np.asarray(ref_cache.positions))
        token_b = jnp.argmax(logits_vb, axis=0).astype(jnp.int32)
        position_b = position_b + 1


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_step_is_the_cached_forward_transposed(variant):
    _compare(init_model({**BASE, **VARIANTS[variant]}, seed=1))


def test_decode_step_applies_lora_adapters():
    model = init_model({**BASE, **VARIANTS["qwen2-bias"]}, seed=2)
    add_adapters(model, LoRASpec(rank=4, alpha=8.0), seed=0)
    rng = np.random.default_rng(3)
    for lora in adapted(model).values():  # fresh adapters are zero: give them weight
        lora.b[...] = jnp.asarray(rng.normal(size=lora.b[...].shape) * 0.2, jnp.float32)
    _compare(model)
