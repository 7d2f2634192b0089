"""A jitted program run on a rollout's train batch with the current state: how GRPO's
reference pass and PPO's reference, critic and advantage pass complete a batch on device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import numpy as np

from jaxpt.tasks.base import RunContext


class BatchFinisher(Protocol):
    """A hook that completes a rollout's train batch on device with the current state
    (PPO: reference log-probs, values, GAE): ``(state, batch) -> (batch, metrics,
    per-row advantage for the log)``. Its state is saved with every checkpoint."""

    def __call__(self, state, batch: dict) -> tuple[dict, dict, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class RolloutProgram:
    """``fn(state, device_batch, *args)``, jitted once, run on a rollout's host batch for a
    ``BatchFinisher``: every process holds the whole rollout and puts its own rows on the
    mesh; the outputs are replicated and come back as host arrays (same pytree)."""

    def __init__(self, ctx: RunContext, fn: Callable):
        self.ctx, self.fn = ctx, fn
        self._jitted = None

    def __call__(self, state, batch: dict, *args):
        from jaxpt.sampling.prompts import to_host
        from jaxpt.sharding import replicated
        from jaxpt.step import local_rows, put_batch

        mesh = self.ctx.mesh
        if self._jitted is None:
            self._jitted = jax.jit(self.fn, out_shardings=replicated(mesh))
        with jax.set_mesh(mesh):
            out = self._jitted(state, put_batch(local_rows(batch, mesh), mesh), *args)
        return jax.tree.map(to_host, out)
