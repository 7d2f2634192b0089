"""Log-probabilities of target tokens, computed in float32 without a full log-softmax copy."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """log p(target) per position [B, T]: the gathered logit minus the logsumexp."""
    logits_btv = logits_btv.astype(jnp.float32)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return target_logit_bt - jax.nn.logsumexp(logits_btv, axis=-1)


def sequence_logprob(token_logprobs_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Sum of token log-probabilities over the masked (response) tokens [B]."""
    return jnp.sum(token_logprobs_bt * mask_bt.astype(jnp.float32), axis=-1)


def entropy_from_logits(logits_btv: jax.Array) -> jax.Array:
    """Entropy of the next-token distribution per position [B, T]."""
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp_btv) * logp_btv, axis=-1)
