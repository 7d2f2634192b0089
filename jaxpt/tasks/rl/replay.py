"""Routing replay for MoE policies (``rl.routing_replay``): which runs record the experts
their sampler routed each token to, and the shape of what a rollout batch carries.

The sampler and the trainer run the same weights through other numerics (a KV cache, one
token at a time, other batch shapes), so near-ties in a router's top k can pick other
experts, and a sampled token's log-prob then differs by far more than rounding. With
replay the sampler records each token's expert ids per layer (``SampleArrays.routing_btlk``)
and the policy's forwards over that rollout route to them (``CausalLM(..., routing=)``),
their routing weights still the trainer's router probabilities at those experts.
"""

from __future__ import annotations

import numpy as np

from jaxpt.config import ConfigError

REPLAYING_TASKS = ("grpo", "ppo")  # whose policy forwards read a batch's ``routing``


def routing_shape(config) -> tuple[int, int] | None:
    """(layers, experts per token) of the ``routing`` [B, T, L, k] a rollout batch of
    ``config`` carries, or None with ``rl.routing_replay`` off. A ConfigError naming the
    key when it is on for a task that does not replay or a model without experts."""
    if not config.rl.routing_replay:
        return None
    from jaxpt.models import config_from_hf
    from jaxpt.tasks.common import hf_config_dict

    if config.task not in REPLAYING_TASKS:
        raise ConfigError(
            f"config key 'rl.routing_replay': task {config.task!r} does not replay routing "
            f"(the tasks that do: {', '.join(REPLAYING_TASKS)})"
        )
    model = config_from_hf(hf_config_dict(config.model.path))
    if not model.num_experts:
        raise ConfigError(
            "config key 'rl.routing_replay' replays a mixture-of-experts router, but "
            f"model.path ({config.model.path}) is a dense model; set rl.routing_replay: false"
        )
    return model.num_layers, model.experts_per_token


def add_routing_spec(spec: dict, config) -> dict:
    """A ``batch_spec`` with the ``routing`` rows of a replaying run (the rows' shape
    from ``input_ids``)."""
    shape = routing_shape(config)
    if shape is not None:
        rows = spec["input_ids"][0]
        spec["routing"] = ((*rows, *shape), np.int32)
    return spec
