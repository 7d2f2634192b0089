"""Per-token log-probs (and entropy, logsumexp, top-1) from hidden states, chunk by chunk.

The LM head's float32 logits are [B, T, V]: for a 150k vocabulary that is the largest
tensor of a train step, and plain autodiff keeps it (or its softmax) alive from the forward
to the backward. ``token_stats`` runs the head over ``chunk_size`` positions at a time in a
``lax.scan`` whose body is rematerialized (``jax.checkpoint``): the forward keeps only the
per-token results, the backward recomputes one chunk's logits at a time. Peak logits memory
is [B, chunk_size, V]; the math (and so values and gradients) is the plain path's, one
chunk at a time. ``chunk_size`` 0 (or >= T) is the plain path itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenStats(NamedTuple):
    """Per-position results [B, T] of the next-token distribution, all float32 (``is_top``
    bool). ``entropy``/``is_top`` are None unless asked for."""

    logprobs: jax.Array  # log p(target)
    logz: jax.Array  # logsumexp of the logits (z-loss)
    entropy: jax.Array | None = None
    is_top: jax.Array | None = None  # the target is (one of) the highest logit(s)


def _stats_of_logits(logits_btv, targets_bt, with_entropy: bool, with_top: bool) -> TokenStats:
    logits_btv = logits_btv.astype(jnp.float32)
    logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    entropy_bt = is_top_bt = None
    if with_entropy:
        # H = logz - E_p[logit]; p is detached from nothing, so the gradient is exact.
        probs_btv = jnp.exp(logits_btv - logz_bt[..., None])
        entropy_bt = logz_bt - jnp.sum(probs_btv * logits_btv, axis=-1)
    if with_top:
        # max, not argmax: XLA:CPU's variadic argmax reduce is several times slower.
        is_top_bt = jax.lax.stop_gradient(target_logit_bt >= jnp.max(logits_btv, axis=-1))
    return TokenStats(target_logit_bt - logz_bt, logz_bt, entropy_bt, is_top_bt)


def token_stats(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden_btd: jax.Array,
    targets_bt: jax.Array,
    chunk_size: int = 0,
    *,
    with_entropy: bool = False,
    with_top: bool = False,
) -> TokenStats:
    """``TokenStats`` of ``logits_fn(hidden)`` at ``targets_bt``, ``chunk_size`` positions of
    every row at a time (0: all at once, the plain path).

    ``logits_fn`` maps hidden states [B, C, D] to logits [B, C, V] (e.g. ``model.logits``,
    optionally divided by a temperature); it may close over parameters, whose gradients
    flow as in the plain path. T need not be a multiple of ``chunk_size``: the last chunk is
    padded and the padding dropped.
    """
    targets_bt = jnp.asarray(targets_bt, jnp.int32)
    return map_chunks(
        lambda hidden_bcd, targets_bc: _stats_of_logits(
            logits_fn(hidden_bcd), targets_bc, with_entropy, with_top
        ),
        chunk_size, hidden_btd, targets_bt,
    )


def map_chunks(fn: Callable, chunk_size: int, *arrays_bt):
    """``fn`` over ``chunk_size`` positions of every row at a time: ``arrays_bt`` are
    [B, T, ...] and ``fn`` maps their [B, C, ...] chunks to a pytree of [B, C] results, which
    come back as [B, T]. A ``lax.scan`` whose body is rematerialized (``jax.checkpoint``):
    the backward recomputes one chunk's intermediates (its logits) instead of storing
    them. T need not be a multiple of ``chunk_size``: the last chunk is padded and the
    padding dropped (``None`` results stay None). ``chunk_size`` 0 (or >= T): ``fn`` on
    the whole arrays."""
    b, t = arrays_bt[0].shape[:2]
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0, got {chunk_size}")
    if chunk_size == 0 or chunk_size >= t:
        return fn(*arrays_bt)
    n_chunks = -(-t // chunk_size)
    pad = n_chunks * chunk_size - t

    def split(x_bt):  # [B, N*C, ...] -> [N, B, C, ...]: the batch axis stays inside a chunk
        x_bt = jnp.pad(x_bt, [(0, 0), (0, pad)] + [(0, 0)] * (x_bt.ndim - 2))
        return jnp.moveaxis(x_bt.reshape(b, n_chunks, chunk_size, *x_bt.shape[2:]), 1, 0)

    chunk = jax.checkpoint(fn)

    def body(carry, xs):
        return carry, chunk(*xs)

    _, results_n = jax.lax.scan(body, None, tuple(split(x) for x in arrays_bt))

    def unchunk(x_nbc):
        return jnp.moveaxis(x_nbc, 0, 1).reshape(b, n_chunks * chunk_size)[:, :t]

    return jax.tree.map(unchunk, results_n)


def model_token_logprobs(
    model,
    input_ids,
    targets_bt,
    mask_bt=None,
    chunk_size: int = 0,
    *,
    positions=None,
    segment_ids=None,
    temperature: float = 1.0,
    with_entropy: bool = False,
):
    """log p(target) [B, T] of a causal LM over ``input_ids`` (and, with ``with_entropy``,
    ``(logprobs, entropy)``), the LM head run ``chunk_size`` positions at a time (0: plain).

    ``temperature`` divides the logits (the sampler's distribution); positions where
    ``mask_bt`` is 0 come back as 0. ``positions``/``segment_ids`` as the model takes them.
    """
    hidden_btd = model(input_ids, positions, segment_ids, return_hidden=True)
    logits_fn = model.logits if temperature == 1.0 else (lambda h: model.logits(h) / temperature)
    stats = token_stats(logits_fn, hidden_btd, targets_bt, chunk_size, with_entropy=with_entropy)
    logprobs_bt, entropy_bt = stats.logprobs, stats.entropy
    if mask_bt is not None:
        keep_bt = jnp.asarray(mask_bt) != 0
        logprobs_bt = jnp.where(keep_bt, logprobs_bt, 0.0)
        entropy_bt = None if entropy_bt is None else jnp.where(keep_bt, entropy_bt, 0.0)
    return (logprobs_bt, entropy_bt) if with_entropy else logprobs_bt
