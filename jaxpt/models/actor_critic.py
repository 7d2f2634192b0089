"""PPO's trained module: the policy (a causal LM) and its critic (per-token values).

The critic is a value head on a backbone of its own (a ``SequenceClassifier``: decoder +
``score`` head, so it can start from a reward model, as OpenRLHF and verl initialise it)
or a value head on the policy's own hidden states (``ScoreHead``; the backbone is shared
and also trained by the value loss). Both live in one NNX module, so one train state, one
optimizer and one checkpoint hold them; the loss reads ``policy`` and ``values``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt.models.classifier import ScoreHead, SequenceClassifier
from jaxpt.models.decoder import CausalLM


class ActorCritic(nnx.Module):
    """``policy`` plus exactly one of ``critic`` (own backbone) or ``value_head`` (shared)."""

    def __init__(
        self,
        policy: CausalLM,
        *,
        critic: SequenceClassifier | None = None,
        value_head: ScoreHead | None = None,
    ):
        if (critic is None) == (value_head is None):
            raise ValueError("ActorCritic needs exactly one of critic= or value_head=")
        self.policy = policy
        self.critic = critic
        self.value_head = value_head

    @property
    def shares_backbone(self) -> bool:
        return self.value_head is not None

    def values(self, batch: dict, window: slice, policy_hidden_btd=None):
        """Float32 values [B, W] at the positions ``window`` of ``batch``'s rows.

        With a shared backbone, ``policy_hidden_btd`` are the policy's hidden states at
        those positions (already computed by the policy loss; required).
        """
        if self.shares_backbone:
            if policy_hidden_btd is None:
                raise ValueError("a shared-backbone critic reads the policy's hidden states")
            return self.value_head.per_token(policy_hidden_btd)[..., 0]
        scores_btl = self.critic.token_scores(
            batch["input_ids"], batch["positions"], batch["segment_ids"]
        )
        return scores_btl[:, window, 0]


def shared_value_head(policy: CausalLM, *, seed: int, mesh, rules) -> ScoreHead:
    """A value head [1, hidden] for ``policy``'s hidden states, zero-initialised (every value
    starts at 0, so the first advantages are the whitened returns), on ``mesh``."""
    from jaxpt.models.hf_io import state_shardings

    config = policy.config
    head = ScoreHead(
        config.hidden_size, 1, rngs=nnx.Rngs(seed), std=0.0, dtype=policy.dtype,
        param_dtype=jnp.float32,
    )
    graphdef, state = nnx.split(head)
    state = jax.device_put(state, state_shardings(state, mesh, rules))
    return nnx.merge(graphdef, state)
