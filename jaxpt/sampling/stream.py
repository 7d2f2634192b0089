"""Token-by-token streaming for interactive use (the CLI): a jitted prefill, then one
jitted decode step per token, so each token can be shown as soon as it exists.

Batch generation never uses this; it runs its whole decode loop in one program
(``engine.sample_arrays``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt.models.decode import decode_step
from jaxpt.models.decoder import KVCache
from jaxpt.sampling.api import bucket, left_pad, prompt_token_lists
from jaxpt.sampling.config import SamplingConfig
from jaxpt.sampling.engine import _StaticGraph
from jaxpt.sampling.processors import choose_tokens


def _pick(logits, rng, step, config, axis=-1):
    """The token drawn from one row's ``logits`` (vocabulary on ``axis``)."""
    keys_b = jax.random.fold_in(jax.random.fold_in(rng, 0), step)[None]
    return choose_tokens(logits, keys_b, config, axis=axis)[0][0]


@functools.partial(jax.jit, static_argnames=("graph", "config", "cache_len"))
def _prefill(graph, state, ids_bt, mask_bt, rng, *, config, cache_len):
    model = nnx.merge(graph.graphdef, state)
    segment_bt = mask_bt.astype(jnp.int32)
    positions_bt = jnp.maximum(jnp.cumsum(segment_bt, axis=1) - 1, 0)
    cache = KVCache.init(model.config, 1, cache_len, model.dtype)
    hidden_btd, cache = model(ids_bt, positions_bt, segment_bt, cache=cache, return_hidden=True)
    logits_bv = model.logits(hidden_btd[:, -1:, :])[:, 0, :]
    return cache, _pick(logits_bv, rng, 0, config), jnp.sum(segment_bt, axis=1)


@functools.partial(jax.jit, static_argnames=("graph", "config"), donate_argnames=("cache",))
def _decode_step(graph, state, cache, token_b, pos_b, rng, step, *, config):
    model = nnx.merge(graph.graphdef, state)
    logits_vb, cache = decode_step(model, token_b, pos_b, cache)  # the batch sampler's step
    return cache, _pick(logits_vb, rng, step, config, axis=0)


def stream_tokens(
    model,
    prompt: Sequence[int],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = 0,
    **sampling,
) -> Iterator[int]:
    """Yield the generated tokens of one prompt as they are produced (eos included).

    ``prompt`` is one prompt in any form ``generate`` accepts (a list of ids, a 1-D array,
    an ``apply_chat_template`` result). Accepts the same sampling arguments as ``generate``
    (``min_p`` and so on, except ``repetition_penalty``, ``stop`` and ``num_samples``).
    """
    rows = prompt_token_lists(prompt)
    if len(rows) != 1 or not rows[0]:
        raise ValueError(f"stream_tokens takes one non-empty prompt, got {len(rows)} prompts")
    prompt = rows[0]
    config = SamplingConfig.make(
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        **sampling,
    )
    eos = set(config.eos_token_ids)
    config = SamplingConfig.make(
        max_new_tokens=1,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        min_p=config.min_p,
    )  # the key the step programs are cached under: no lengths, no eos
    length = bucket(len(prompt))
    ids_bt, mask_bt = left_pad([prompt], 1, length)
    graphdef, state = nnx.split(model)
    graph, rng = _StaticGraph(graphdef), jax.random.key(seed)
    cache_len = length + bucket(max_new_tokens)
    cache, token, pos_b = _prefill(
        graph, state, ids_bt, mask_bt, rng, config=config, cache_len=cache_len
    )
    for step in range(1, max_new_tokens + 1):
        value = int(token)
        yield value
        if value in eos or step == max_new_tokens:
            return
        cache, token = _decode_step(
            graph, state, cache, token[None], pos_b + step - 1, rng, step, config=config
        )


def stream_text(model, tokenizer, prompt, **sampling) -> Iterator[str]:
    """Yield the reply to one prompt as text pieces, as they are generated.

    Special tokens are dropped. Takes the arguments of ``stream_tokens``.
    """
    tokens, shown, text = [], "", ""
    for token in stream_tokens(model, prompt, **sampling):
        tokens.append(token)
        # Decode the whole reply each time: a token may complete a multi-byte character,
        # and until it does the text ends in U+FFFD, which is held back.
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.startswith(shown) and len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown) :]
            shown = text
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown) :]
