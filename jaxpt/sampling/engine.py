"""The jitted sampler: one prefill, then ``lax.while_loop``s of single-token decode steps.

Everything between the prompt and the last token runs inside one compiled function over
a preallocated KV cache that lives in the loop carry (updated in place). Long generations
decode in a few stages whose cache grows between them (``decode_stages``), so early steps
do not read the empty slots of later ones. The model enters
as ``(graphdef, state)``: the graphdef is static, the weights are a traced argument, so
new weights (an RL step) reuse the compiled program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxpt.models.decode import decode_step
from jaxpt.models.decoder import KVCache, with_layers_unstacked
from jaxpt.models.layers import DECODE_BLOCK, target_platform
from jaxpt.models.moe import collect_routing
from jaxpt.sampling.config import SamplingConfig
from jaxpt.sampling.processors import choose_with_logprobs
from jaxpt.sharding import constrain, rules_key, use_rules

_TRACES = 0  # times the sampler was traced (= compiled); tests read it via trace_count()


def trace_count() -> int:
    """How many times the sampler has been traced (each trace is one compilation)."""
    return _TRACES


@struct.dataclass
class SampleArrays:
    """Padded sampler output; row ``i * num_samples + j`` is sample ``j`` of prompt ``i``.

    - ``tokens_bn``: generated tokens, ``pad_token_id`` after each row's end.
    - ``logprobs_bn``: log-prob of each token under the distribution it was sampled from
      (after repetition penalty, temperature, top-k/top-p/min-p and renormalization);
      0 past the end.
    - ``model_logprobs_bn``: log-prob under the raw model at temperature 1 with no
      filtering, ``log_softmax(logits)[token]``: the model's own likelihood of the text.
    - ``policy_logprobs_bn``: log-prob under the policy an RL loss trains,
      ``log_softmax(logits / temperature)[token]`` of the raw logits (no repetition
      penalty, no top-k/top-p/min-p), in float32: what GRPO's and PPO's teacher-forced
      forward computes, so these are the old log-probs of their importance ratio (the
      first iteration's ratio is 1 whatever the filters). Greedy: temperature 1.
    - ``lengths_b``: number of valid tokens per row (eos / stop sequence included).
    - ``finished_b``: the row ended with an eos token or a stop sequence.
    - ``truncated_b``: the row ran out of new tokens before finishing.
    - ``routing_btlk``: only when asked (``record_routing``, MoE models): the expert ids
      [B, T, L, k] (int32) each layer routed each token to, ``T`` the left-padded prompt
      then the ``n`` new-token columns, as an RL train row lays out prompt + completion;
      -1 where no forward ran the token (a completion's last token, padding after it).
    """

    tokens_bn: jax.Array
    logprobs_bn: jax.Array
    model_logprobs_bn: jax.Array
    policy_logprobs_bn: jax.Array
    lengths_b: jax.Array
    finished_b: jax.Array
    truncated_b: jax.Array
    routing_btlk: jax.Array | None = None

    @property
    def mask_bn(self) -> jax.Array:
        """1 for generated tokens, 0 for padding."""
        n = self.tokens_bn.shape[1]
        return jnp.arange(n, dtype=jnp.int32)[None, :] < self.lengths_b[:, None]


class _StaticGraph:
    """A GraphDef as a jit static argument: equal by value, hashable even when the model
    carries unhashable static attributes (e.g. its transformers config)."""

    def __init__(self, graphdef):
        self.graphdef = graphdef
        try:
            self._hash = hash(graphdef)
        except TypeError:  # collisions only cost an equality check
            self._hash = hash((type(graphdef).__name__, getattr(graphdef, "num_leaves", 0)))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _StaticGraph) and self.graphdef == other.graphdef


def _merge(graphdef, state):
    states = state if isinstance(state, (tuple, list)) else (state,)
    return nnx.merge(graphdef, *states)


def _constrain_cache(cache: KVCache) -> KVCache:
    return cache.replace(
        k=tuple(constrain(k, ("batch", "kv_heads", None, "cache_seq")) for k in cache.k),
        v=tuple(constrain(v, ("batch", "kv_heads", "cache_seq", None)) for v in cache.v),
        segment_ids=constrain(cache.segment_ids, ("batch", "cache_seq")),
        positions=constrain(cache.positions, ("batch", "cache_seq")),
    )


def cache_length(slots: int) -> int:
    """Cache slots for ``slots`` tokens: long caches round up to whole blocks of
    ``DECODE_BLOCK``, so decoding reads only the blocks written so far (the extra slots
    stay empty and masked)."""
    if slots < 2 * DECODE_BLOCK:
        return slots
    return -(-slots // DECODE_BLOCK) * DECODE_BLOCK


DECODE_STAGE = 32  # new tokens per stage of the decode loop; each stage compiles one body
MAX_DECODE_STAGES = 4


def decode_stages(
    prompt_len: int, max_new_tokens: int, max_stages: int = MAX_DECODE_STAGES
) -> tuple[tuple[int, int], ...]:
    """``(cache_slots, last_step)`` per stage of the decode loop.

    Every decode step reads the whole KV cache it is given, and attention over the cache
    is bandwidth-bound, so the loop runs in stages over a cache that grows between them:
    a stage's cache holds the prompt and the tokens up to its last step, no more. Up to
    ``max_stages`` equal stages of at least ``DECODE_STAGE`` new tokens; a stage costs one
    more compiled loop body, so short generations stay in one stage.
    """
    count = max(1, min(max_stages, max_new_tokens // DECODE_STAGE))
    ends = [-(-max_new_tokens * (i + 1) // count) for i in range(count)]
    return tuple((cache_length(prompt_len + end), end) for end in ends)


def _grow_cache(cache: KVCache, slots: int) -> KVCache:
    """``cache`` with empty slots appended up to ``slots`` (segment 0 masks them)."""
    extra = slots - cache.segment_ids.shape[1]
    if extra == 0:
        return cache
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
    return _constrain_cache(
        cache.replace(
            k=tuple(pad(k, 3) for k in cache.k),
            v=tuple(pad(v, 2) for v in cache.v),
            segment_ids=pad(cache.segment_ids, 1),
            positions=pad(cache.positions, 1),
        )
    )


def _repeat_rows(x, n: int):
    return (
        x if n == 1 or x.ndim == 0 else jnp.repeat(x, n, axis=0, total_repeat_length=x.shape[0] * n)
    )


def _stop_hit(tokens_bn, step, stop_seqs):
    """Whether the tokens up to column ``step`` end with any stop sequence."""
    hit_b = jnp.zeros(tokens_bn.shape[:1], bool)
    for seq in stop_seqs:
        length = len(seq)
        start = jnp.maximum(step - length + 1, 0)
        window_bl = jax.lax.dynamic_slice_in_dim(tokens_bn, start, length, axis=1)
        matches_b = jnp.all(window_bl == jnp.asarray(seq, jnp.int32)[None, :], axis=1)
        hit_b = hit_b | (matches_b & (step >= length - 1))
    return hit_b


def _routed(forward):
    """``forward()``'s output and the expert ids it routed to, [B, T, L, k]."""
    with collect_routing() as routing:
        out = forward()
    if len(routing) != 1:
        raise ValueError("recording the routing needs a mixture-of-experts model")
    return out, jnp.transpose(routing[0], (1, 2, 0, 3))


def _sample(graphdef, state, prompt_ids_bt, prompt_mask_bt, rng, limit, eos_e, config,
            record_routing=False):
    global _TRACES
    _TRACES += 1
    model = _merge(graphdef.graphdef, state)
    if target_platform() == "cpu":  # slice the stacked layers once, not at every step
        model = with_layers_unstacked(model)
    n_new, n_samples = config.max_new_tokens, config.num_samples
    b, t = prompt_ids_bt.shape
    rows = b * n_samples
    ids_bt = constrain(prompt_ids_bt.astype(jnp.int32), ("batch", None))
    segment_bt = constrain((prompt_mask_bt != 0).astype(jnp.int32), ("batch", None))
    positions_bt = jnp.maximum(jnp.cumsum(segment_bt, axis=1) - 1, 0)
    prompt_len_b = jnp.sum(segment_bt, axis=1)

    # Prefill; only the last position (every prompt is left-padded to end there) needs
    # logits, so the [B, T, V] tensor is never built.
    # Growing the cache holds the old and the new one at once (up to 1.75x the final
    # cache), so accelerators, where the cache is what limits the batch, keep one stage.
    stages = decode_stages(t, n_new, MAX_DECODE_STAGES if target_platform() == "cpu" else 1)
    cache = _constrain_cache(KVCache.init(model.config, b, stages[0][0], model.dtype))
    prefill = lambda: model(ids_bt, positions_bt, segment_bt, cache=cache, return_hidden=True)
    if record_routing:
        (hidden_btd, cache), prompt_routing_btlk = _routed(prefill)
    else:
        hidden_btd, cache = prefill()
    logits_bv = model.logits(hidden_btd[:, -1:, :])[:, 0, :]

    # num_samples: one prefill per prompt, its cache copied to the samples.
    cache = _constrain_cache(jax.tree.map(lambda x: _repeat_rows(x, n_samples), cache))
    cache = cache.replace(index=jnp.asarray(t, jnp.int32))
    # The decode loop works vocabulary-major ([V, B] logits, see jaxpt.models.decode).
    logits_vb = _repeat_rows(logits_bv, n_samples).T
    next_pos_b = _repeat_rows(prompt_len_b, n_samples)
    row_keys_b = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(rows))
    stop_seqs = tuple(s for s in config.stop if len(s) <= n_new)

    seen_vb = None
    if config.repetition_penalty is not None:
        vocab = logits_bv.shape[-1]
        seen_bv = jnp.zeros((b, vocab), bool)
        seen_bv = seen_bv.at[jnp.arange(b)[:, None], ids_bt].max(segment_bt != 0)
        seen_vb = _repeat_rows(seen_bv, n_samples).T

    def pick(step, logits_vb, seen_vb, done_b, out):
        """Choose the token at column ``step`` and record it (rows already done get pads)."""
        tokens_bn, logprobs_bn, model_lp_bn, policy_lp_bn, lengths_b = out
        step_keys_b = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys_b)
        token_b, logprob_b, model_lp_b, policy_lp_b = choose_with_logprobs(
            logits_vb, step_keys_b, config, axis=0, seen=seen_vb
        )
        keep_b = ~done_b
        column = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x[:, None], step, 1)
        tokens_bn = column(tokens_bn, jnp.where(keep_b, token_b, config.pad_token_id))
        logprobs_bn = column(logprobs_bn, jnp.where(keep_b, logprob_b, 0.0))
        model_lp_bn = column(model_lp_bn, jnp.where(keep_b, model_lp_b, 0.0))
        policy_lp_bn = column(policy_lp_bn, jnp.where(keep_b, policy_lp_b, 0.0))
        lengths_b = jnp.where(keep_b, step + 1, lengths_b)
        ended_b = jnp.any(token_b[:, None] == eos_e[None, :], axis=1)
        if stop_seqs:
            ended_b = ended_b | _stop_hit(tokens_bn, step, stop_seqs)
        out = (tokens_bn, logprobs_bn, model_lp_bn, policy_lp_bn, lengths_b)
        return token_b, done_b | ended_b, out

    def mark_seen(seen_vb, token_b):
        if seen_vb is None:
            return None
        return seen_vb.at[token_b, jnp.arange(rows)].set(True)

    routing_bnlk = None
    if record_routing:  # the expert ids of the token each decode step feeds
        *_, layers, k = prompt_routing_btlk.shape
        routing_bnlk = constrain(jnp.full((rows, n_new, layers, k), -1, jnp.int32),
                                 ("batch", None, None, None))
    out = (
        constrain(jnp.full((rows, n_new), config.pad_token_id, jnp.int32), ("batch", None)),
        constrain(jnp.zeros((rows, n_new), jnp.float32), ("batch", None)),
        constrain(jnp.zeros((rows, n_new), jnp.float32), ("batch", None)),
        constrain(jnp.zeros((rows, n_new), jnp.float32), ("batch", None)),
        jnp.zeros((rows,), jnp.int32),
    )
    done_b = jnp.zeros((rows,), bool)
    token_b, done_b, out = pick(0, logits_vb, seen_vb, done_b, out)
    seen_vb = mark_seen(seen_vb, token_b)

    def body(carry):
        step, cache, token_b, done_b, seen_vb, out, routing_bnlk = carry
        decode = lambda: decode_step(model, token_b, next_pos_b + step - 1, cache)
        if routing_bnlk is None:
            logits_vb, cache = decode()
        else:  # the token fed is column step - 1's
            (logits_vb, cache), routing_b1lk = _routed(decode)
            routing_bnlk = jax.lax.dynamic_update_slice_in_dim(
                routing_bnlk, routing_b1lk, step - 1, 1
            )
        token_b, done_b, out = pick(step, logits_vb, seen_vb, done_b, out)
        return step + 1, cache, token_b, done_b, mark_seen(seen_vb, token_b), out, routing_bnlk

    step = jnp.asarray(1, jnp.int32)
    for slots, last_step in stages:
        def cond(carry, last_step=last_step):
            step, _, _, done_b, _, _, _ = carry
            return (step < jnp.minimum(limit, last_step)) & ~jnp.all(done_b)

        carry = (step, _grow_cache(cache, slots), token_b, done_b, seen_vb, out, routing_bnlk)
        step, cache, token_b, done_b, seen_vb, out, routing_bnlk = jax.lax.while_loop(
            cond, body, carry
        )
    tokens_bn, logprobs_bn, model_lp_bn, policy_lp_bn, lengths_b = out
    routing_btlk = None
    if record_routing:  # prompt rows repeated per sample; nothing ran a row's last token
        fed_bn = jnp.arange(n_new)[None, :] < lengths_b[:, None] - 1
        routing_bnlk = jnp.where(fed_bn[:, :, None, None], routing_bnlk, -1)
        routing_btlk = jnp.concatenate(
            [_repeat_rows(prompt_routing_btlk, n_samples), routing_bnlk], axis=1
        )
    return SampleArrays(
        tokens_bn=tokens_bn,
        logprobs_bn=logprobs_bn,
        model_logprobs_bn=model_lp_bn,
        policy_logprobs_bn=policy_lp_bn,
        lengths_b=lengths_b,
        finished_b=done_b,
        truncated_b=~done_b,
        routing_btlk=routing_btlk,
    )


def _sample_under_rules(graphdef, state, prompt_ids_bt, prompt_mask_bt, rng, limit, eos_e,
                        config, rules, record_routing):
    with use_rules(dict(rules)):
        return _sample(graphdef, state, prompt_ids_bt, prompt_mask_bt, rng, limit, eos_e, config,
                       record_routing)


# `rules` (the logical-axis table, hashable) is static: a run's mesh.rules shape the cache.
_sample_jit = jax.jit(
    _sample_under_rules, static_argnames=("graphdef", "config", "rules", "record_routing")
)


def sample_arrays(
    graphdef,
    state,
    prompt_ids_bt,
    prompt_mask_bt,
    rng,
    config: SamplingConfig,
    *,
    limit: int | jax.Array | None = None,
    record_routing: bool = False,
) -> SampleArrays:
    """Sample completions for a left-padded prompt batch; the RL trainer's entry point.

    ``graphdef``/``state`` come from ``nnx.split(model)`` (``state`` may be a tuple of
    states, e.g. ``(params, rest)``, merged in order); the weights are traced, so new
    weights do not recompile. ``prompt_ids_bt`` [B, T] is left-padded with
    ``prompt_mask_bt`` (1 = real token; every row needs at least one). ``rng`` is a JAX key;
    row ``r`` draws from ``fold_in(fold_in(rng, r), step)``, so samples do not depend on
    the mesh. ``limit`` (traced, <= ``config.max_new_tokens``) stops earlier without
    recompiling. Call under ``jax.set_mesh(mesh)`` to run sharded: the batch is split over
    the data axes and the cache follows the model's logical sharding rules.
    Output rows are ``B * config.num_samples``; see ``SampleArrays``. ``record_routing``
    (MoE models) also returns each token's routed expert ids (``routing_btlk``), for
    routing replay in the trainer's forward.
    """
    limit = config.max_new_tokens if limit is None else limit
    limit = jnp.minimum(jnp.asarray(limit, jnp.int32), config.max_new_tokens)
    # eos ids travel as a padded array (-1 never matches), so changing them reuses the
    # program; everything else in the config is static.
    eos = config.eos_token_ids
    eos_e = np.full(max(4, 1 << (len(eos) - 1).bit_length()), -1, np.int32)
    eos_e[: len(eos)] = eos
    static_config = dataclasses.replace(config, eos_token_ids=())
    return _sample_jit(
        _StaticGraph(graphdef),
        state,
        prompt_ids_bt,
        prompt_mask_bt,
        rng,
        limit,
        eos_e,
        config=static_config,
        rules=rules_key(),
        record_routing=record_routing,
    )
