"""Pure functions from next-token logits to the distribution a token is drawn from.

The order follows transformers' ``generate``: repetition penalty, then temperature, top-k,
top-p and min-p. Every filter is skipped at trace time when disabled, so the common cases
(greedy, plain temperature) never sort the vocabulary.

Logits are [B, V] by default; ``axis=0`` takes them vocabulary-major, [V, B], as the
sampler's feature-major decode step produces them (``jaxpt.models.layers.FEATURE_MAJOR``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpt.sampling.config import SamplingConfig


def penalize_repetition(logits_bv, seen_bv, penalty: float):
    """CTRL-style penalty on tokens already seen: divide positive logits, multiply negative."""
    penalized = jnp.where(logits_bv < 0, logits_bv * penalty, logits_bv / penalty)
    return jnp.where(seen_bv, penalized, logits_bv)


def sampling_logprobs(logits_bv, config: SamplingConfig, axis: int = -1):
    """Log-probabilities of the (truncated, renormalized) sampling distribution.

    Returns ``(logprobs_bk, ids_bk)``: with top-k the candidates are the top ``k`` tokens
    (sorted, ``ids_bk`` maps them back to the vocabulary); otherwise the whole vocabulary
    in order and ``ids_bk`` is None. Removed tokens get ``-inf``. ``axis`` is the
    vocabulary's; top-k needs it last.
    """
    axis = axis % logits_bv.ndim
    scores_bk = logits_bv / config.temperature if config.temperature != 1 else logits_bv
    ids_bk = None
    if config.top_k is not None:
        if axis != logits_bv.ndim - 1:
            raise ValueError("top-k needs the vocabulary on the last axis")
        k = min(config.top_k, logits_bv.shape[-1])
        scores_bk, ids_bk = jax.lax.top_k(scores_bk, k)  # sorted descending
    if config.top_p is not None and ids_bk is not None:
        probs_bk = jax.nn.softmax(scores_bk, axis=-1)
        mass_before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        scores_bk = jnp.where(mass_before_bk < config.top_p, scores_bk, -jnp.inf)
    elif config.top_p is not None:
        keep_bk = nucleus_mask(scores_bk, config.top_p, axis)
        scores_bk = jnp.where(keep_bk, scores_bk, -jnp.inf)
    if config.min_p is not None:
        logprobs_bk = jax.nn.log_softmax(scores_bk, axis=axis)
        threshold_b1 = jnp.max(logprobs_bk, axis=axis, keepdims=True) + jnp.log(config.min_p)
        scores_bk = jnp.where(logprobs_bk >= threshold_b1, scores_bk, -jnp.inf)
    return jax.nn.log_softmax(scores_bk, axis=axis), ids_bk


def nucleus_mask(scores_bv, top_p: float, axis: int = -1):
    """Top-p without sorting the vocabulary: keep token ``i`` when the probability mass of
    the tokens more likely than ``i`` is below ``top_p`` (the sorted-prefix rule).

    That mass, ``S(x) = sum(p_j for p_j > x)``, falls as ``x`` rises, so the kept set is
    ``p >= x0`` for the smallest float ``x0`` with ``S(x0) < top_p``. Non-negative floats
    order like their int32 bit patterns, so a bisection over the bits finds ``x0`` exactly
    in 31 masked sums: far cheaper than a full sort of a 50k-150k vocabulary per step.
    """
    probs_bv = jax.nn.softmax(scores_bv.astype(jnp.float32), axis=axis)

    def threshold(bits_b):  # per row, broadcast along the vocabulary
        return jnp.expand_dims(jax.lax.bitcast_convert_type(bits_b, jnp.float32), axis)

    def mass_above(bits_b):
        return jnp.sum(jnp.where(probs_bv > threshold(bits_b), probs_bv, 0.0), axis=axis)

    def halve(_, bounds):
        lo_b, hi_b = bounds
        mid_b = lo_b + (hi_b - lo_b) // 2
        inside_b = mass_above(mid_b) < top_p
        return jnp.where(inside_b, lo_b, mid_b + 1), jnp.where(inside_b, mid_b, hi_b)

    # S(max p) = 0 < top_p, so the top token's bits are a valid upper bound.
    hi_b = jax.lax.bitcast_convert_type(jnp.max(probs_bv, axis=axis), jnp.int32)
    lo_b = jnp.zeros_like(hi_b)
    _, x0_b = jax.lax.fori_loop(0, 31, halve, (lo_b, hi_b))
    return probs_bv >= threshold(x0_b)


def choose_tokens(logits_bv, keys_b, config: SamplingConfig, axis: int = -1):
    """Draw one token per row; returns ``(token_b, logprob_b)``. ``axis`` is the
    vocabulary's: -1 for [B, V] logits, 0 for [V, B].

    ``logprob_b`` is the chosen token's log-probability under the distribution it was drawn
    from. Greedy decoding has no proper distribution, so it reports the temperature-1,
    untruncated log-softmax of ``logits_bv`` (which includes any repetition penalty).
    """
    axis = axis % logits_bv.ndim
    if config.greedy:
        return greedy_choice(logits_bv, axis)
    if config.top_k is not None and axis != logits_bv.ndim - 1:
        logits_bv, axis = jnp.moveaxis(logits_bv, axis, -1), logits_bv.ndim - 1  # top-k sorts
    logprobs_bk, ids_bk = sampling_logprobs(logits_bv, config, axis)
    # Per-row keys: a row's draw depends only on its own key, never on the mesh layout.
    # jax.random.categorical's Gumbel-max draw (the same noise, so the same tokens), with
    # the argmax done by ``first_argmax``.
    vocab = logprobs_bk.shape[axis]
    noise_bk = jax.vmap(
        lambda key: jax.random.gumbel(key, (vocab,), logprobs_bk.dtype), out_axes=1 - axis
    )(keys_b)
    choice_b = first_argmax(logprobs_bk + noise_bk, axis)
    logprob_b = _pick(logprobs_bk, choice_b, axis)
    if ids_bk is None:
        return choice_b, logprob_b
    return _pick(ids_bk, choice_b, axis), logprob_b


def _pick(values_bv, index_b, axis: int):
    """``values[row, index[row]]`` along the vocabulary ``axis``."""
    index = jnp.expand_dims(index_b, axis)
    return jnp.squeeze(jnp.take_along_axis(values_bv, index, axis=axis), axis)


def greedy_choice(logits_bv, axis: int = -1):
    """``(first_argmax, log_softmax(logits)[first_argmax])`` per row, sharing one max.

    The chosen logit is the row's max, so its log-probability is
    ``-log(sum(exp(logits - max)))``: one pass over the vocabulary for the max, one for the
    token and one for the sum, where ``token_logprob`` would take the max again and gather.
    """
    axis = axis % logits_bv.ndim
    best_b1 = jnp.max(logits_bv, axis=axis, keepdims=True)
    token_b = _first_index_of(logits_bv, best_b1, axis)
    total_b = jnp.sum(jnp.exp(logits_bv - best_b1), axis=axis)
    return token_b, -jnp.log(total_b)


def _first_index_of(logits_bv, best_b1, axis: int):
    vocab = logits_bv.shape[axis]
    ids_v = jax.lax.broadcasted_iota(jnp.int32, logits_bv.shape, axis)
    first_b = jnp.min(jnp.where(logits_bv == best_b1, ids_v, vocab), axis=axis)
    return jnp.minimum(first_b, vocab - 1)  # a NaN row matches nothing


def first_argmax(logits_bv, axis: int = -1):
    """``argmax`` over ``axis`` (the first index on ties) as two plain reductions: XLA
    CPU runs argmax's paired (value, index) reduction several times slower."""
    axis = axis % logits_bv.ndim
    return _first_index_of(logits_bv, jnp.max(logits_bv, axis=axis, keepdims=True), axis)


def token_logprob(logits_bv, token_b, axis: int = -1):
    """``log_softmax(logits)[token]`` per row (vocabulary on ``axis``) without
    materializing the full softmax."""
    return _pick(logits_bv, token_b, axis) - jax.nn.logsumexp(logits_bv, axis=axis)


def choose_with_logprobs(logits_vb, keys_b, config: SamplingConfig, axis: int = -1, seen=None):
    """``choose_tokens`` plus the log-probs every sampler reports: ``(token_b, logprob_b,
    model_logprob_b, policy_logprob_b)`` (see ``engine.SampleArrays``). ``seen``
    (tokens already in each row, laid out as the logits) applies the repetition penalty.
    """
    model_logits = logits_vb
    if seen is not None:
        logits_vb = penalize_repetition(logits_vb, seen, config.repetition_penalty)
    token_b, logprob_b = choose_tokens(logits_vb, keys_b, config, axis=axis)
    if config.greedy and seen is None:  # the same log-softmax of the same logits
        model_lp_b = logprob_b
    else:
        model_lp_b = token_logprob(model_logits, token_b, axis=axis)
    # The loss's arithmetic: float32 logits / temperature, then log-softmax.
    if config.greedy or config.temperature == 1:
        policy_lp_b = model_lp_b
    else:
        policy_lp_b = token_logprob(model_logits / config.temperature, token_b, axis=axis)
    return token_b, logprob_b, model_lp_b, policy_lp_b
