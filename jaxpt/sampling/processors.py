"""Pure functions from next-token logits to the distribution a token is drawn from.

The order follows transformers' ``generate``: repetition penalty, then temperature, top-k,
top-p and min-p. Every filter is skipped at trace time when disabled, so the common cases
(greedy, plain temperature) never sort the vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpt.sampling.config import SamplingConfig


def penalize_repetition(logits_bv, seen_bv, penalty: float):
    """CTRL-style penalty on tokens already seen: divide positive logits, multiply negative."""
    penalized = jnp.where(logits_bv < 0, logits_bv * penalty, logits_bv / penalty)
    return jnp.where(seen_bv, penalized, logits_bv)


def sampling_logprobs(logits_bv, config: SamplingConfig):
    """Log-probabilities of the (truncated, renormalized) sampling distribution.

    Returns ``(logprobs_bk, ids_bk)``: with top-k or top-p the candidates are the top
    ``k`` tokens (sorted, ``ids_bk`` maps them back to the vocabulary); otherwise the whole
    vocabulary in order and ``ids_bk`` is None. Removed tokens get ``-inf``.
    """
    scores_bk = logits_bv / config.temperature if config.temperature != 1 else logits_bv
    ids_bk = None
    if config.top_k is not None or config.top_p is not None:
        k = min(config.top_k or logits_bv.shape[-1], logits_bv.shape[-1])
        scores_bk, ids_bk = jax.lax.top_k(scores_bk, k)  # sorted descending
    if config.top_p is not None:
        probs_bk = jax.nn.softmax(scores_bk, axis=-1)
        mass_before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        scores_bk = jnp.where(mass_before_bk < config.top_p, scores_bk, -jnp.inf)
    if config.min_p is not None:
        logprobs_bk = jax.nn.log_softmax(scores_bk, axis=-1)
        threshold_b1 = jnp.max(logprobs_bk, axis=-1, keepdims=True) + jnp.log(config.min_p)
        scores_bk = jnp.where(logprobs_bk >= threshold_b1, scores_bk, -jnp.inf)
    return jax.nn.log_softmax(scores_bk, axis=-1), ids_bk


def choose_tokens(logits_bv, keys_b, config: SamplingConfig):
    """Draw one token per row; returns ``(token_b, logprob_b)``.

    ``logprob_b`` is the chosen token's log-probability under the distribution it was drawn
    from. Greedy decoding has no proper distribution, so it reports the temperature-1,
    untruncated log-softmax of ``logits_bv`` (which includes any repetition penalty).
    """
    if config.greedy:
        token_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        return token_b, token_logprob(logits_bv, token_b)
    logprobs_bk, ids_bk = sampling_logprobs(logits_bv, config)
    # Per-row keys: a row's draw depends only on its own key, never on the mesh layout.
    choice_b = jax.vmap(jax.random.categorical)(keys_b, logprobs_bk).astype(jnp.int32)
    logprob_b = jnp.take_along_axis(logprobs_bk, choice_b[:, None], axis=-1)[:, 0]
    if ids_bk is None:
        return choice_b, logprob_b
    return jnp.take_along_axis(ids_bk, choice_b[:, None], axis=-1)[:, 0], logprob_b


def token_logprob(logits_bv, token_b):
    """``log_softmax(logits_bv)[token_b]`` per row without materializing the full softmax."""
    picked_b = jnp.take_along_axis(logits_bv, token_b[:, None], axis=-1)[:, 0]
    return picked_b - jax.nn.logsumexp(logits_bv, axis=-1)
