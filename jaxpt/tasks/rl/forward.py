"""The loss-side forward of the RL tasks: final hidden states at a train batch's completion
positions, running each group's shared prompt once."""

from __future__ import annotations

import jax.numpy as jnp

from jaxpt.tasks.rl.batch import completion_window


def completion_hidden(model, batch: dict, max_completion_length: int, group: int = 1,
                      routing_btlk=None):
    """Final hidden states [B, Lc, D] at the positions that predict completion tokens.

    With ``group`` > 1 the rows come in groups that share one prompt (a rollout's
    ``samples_per_prompt``): each prompt is run once into a KV cache that the group's
    completions then attend to, instead of once per completion. The math is the full
    forward's (the cache gradient sums over the group); with short completions after long
    prompts it is most of the forward and backward saved.

    ``routing_btlk`` [B, T, L, k] (an MoE policy's rollout, ``rl.routing_replay``): the
    expert ids the sampler routed each token to, replayed by the forward.
    """
    from jaxpt.models import KVCache

    ids, positions, segments = batch["input_ids"], batch["positions"], batch["segment_ids"]
    lp = ids.shape[1] - max_completion_length
    routing_lbtk = None if routing_btlk is None else jnp.transpose(routing_btlk, (2, 0, 1, 3))
    if group == 1:
        hidden_btd = model(ids, positions, segments, return_hidden=True, routing=routing_lbtk)
        return hidden_btd[:, completion_window(ids.shape[1], max_completion_length)]
    cache = KVCache.init(model.config, ids.shape[0] // group, ids.shape[1], model.dtype)
    prompt_hidden, cache = model(
        ids[::group, :lp], positions[::group, :lp], segments[::group, :lp], cache=cache,
        return_hidden=True, routing=None if routing_lbtk is None else routing_lbtk[:, ::group, :lp],
    )
    repeat = lambda x: jnp.repeat(x, group, axis=0)
    cache = KVCache(
        k=tuple(map(repeat, cache.k)), v=tuple(map(repeat, cache.v)),
        segment_ids=repeat(cache.segment_ids), positions=repeat(cache.positions),
        index=cache.index,
    )
    completion_hidden_btd, _ = model(
        ids[:, lp:], positions[:, lp:], segments[:, lp:], cache=cache, return_hidden=True,
        routing=None if routing_lbtk is None else routing_lbtk[:, :, lp:],
    )
    # The last prompt position predicts the first completion token.
    return jnp.concatenate(
        [repeat(prompt_hidden[:, -1:]), completion_hidden_btd[:, :-1]], axis=1
    )
