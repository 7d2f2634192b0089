"""The sampler's decoding step: one token per row through a ``CausalLM``'s KV cache.

On CPU the step runs the model's own modules feature-major (``layers.Layout``: every
projection is ``W @ x`` and the logits come out [V, B], ready for the token choice to
reduce over their leading axis, ``jaxpt.sampling.processors`` with ``axis=0``). GPU and
TPU compilers choose layouts themselves, so there it is the batch-major cached forward
with its logits transposed.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxpt.models.decoder import CausalLM, KVCache
from jaxpt.models.layers import BATCH_MAJOR, FEATURE_MAJOR, target_platform


def decode_step(model: CausalLM, token_b, position_b, cache: KVCache):
    """Feed one token per row (``token_b`` [B] at rotary positions ``position_b`` [B]) to
    ``model`` through ``cache``; returns float32 logits [V, B] and the updated cache.

    The same as ``model(token_b[:, None], position_b[:, None], ones, cache=cache)`` with
    its logits transposed.
    """
    layout = FEATURE_MAJOR if target_platform() == "cpu" else BATCH_MAJOR
    segment_b1 = jnp.ones((token_b.shape[0], 1), jnp.int32)
    logits, cache = model(
        token_b[:, None], position_b.astype(jnp.int32)[:, None], segment_b1, cache=cache,
        layout=layout,
    )
    return (logits if layout is FEATURE_MAJOR else logits[:, 0, :].T), cache
