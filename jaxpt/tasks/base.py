"""The task interface: what the one training loop needs from SFT, RM, DPO, GRPO, PPO.

A task is a ``Task`` record of plain functions, found by name in ``jaxpt.tasks``. The loop
calls them in a fixed order and never branches on the task:

    model, extras = task.build(ctx)                 # the trained module + frozen task state
    loss_fn = task.make_loss(ctx)                   # pure LossFn with the task's options bound
    source = task.make_train_source(ctx)            # BatchSource: next(state) -> (batch, host)
    evaluate = task.make_evaluator(ctx)             # (state) -> {"eval_loss": ...} or None
    ... train_step(state, batch) calls loss_fn(model, micro_batch, step_ctx) ...
    task.export(ctx, state, out_dir)                # e.g. an HF checkpoint + tokenizer

LOSS CONTRACT. ``loss_fn(model, batch, step_ctx) -> LossOutput`` returns *sums*, never means:

    numerator    scalar, differentiated: the loss summed over this batch's units
    denominator  scalar, not differentiated: how many units (tokens, pairs, sequences, ...)
    metrics      {name: sum}, each reported as sum / denominator (same unit as the loss)
    totals       {name: sum}, reported as plain totals (e.g. trained tokens)

The train step splits the global batch into ``grad_accum_steps`` micro-batches, sums the
numerators, denominators, metric sums and gradients of the numerators over them, and only
then divides: ``loss = sum(num) / sum(den)``, ``grad = sum(grad num) / sum(den)``. Gradient
accumulation therefore equals one big batch exactly, and packed and unpacked batches give
the same per-unit normalization. Examples:

    SFT   numerator = sum of per-token CE over trained tokens, denominator = trained tokens
    DPO   numerator = sum over pairs of -log sigmoid(beta * margin), denominator = pairs
    GRPO  token-level: sum of token losses / number of completion tokens;
          sequence-level: sum over sequences of each sequence's mean token loss / sequences;
          Dr. GRPO: sum of token losses / (num sequences * max completion length)

A denominator of zero (an all-padding batch) gives zero loss and zero gradient.

BATCH SOURCES. ``next(state)`` receives the current ``TrainState`` so that on-policy tasks
(GRPO, PPO) can sample rollouts with the current params; file-based tasks ignore it. It
returns a dict of host numpy arrays (global-batch leading dim for this process's share) and
a dict of host metrics (floats) to log. ``get_state()``/``set_state()`` return/accept a
JSON-serializable dict saved with every checkpoint, so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class LossOutput:
    """Sums from one (micro-)batch; see the loss contract in the module docstring."""

    numerator: jax.Array
    denominator: jax.Array
    metrics: dict[str, jax.Array] = struct.field(default_factory=dict)
    totals: dict[str, jax.Array] = struct.field(default_factory=dict)


@struct.dataclass
class StepContext:
    """What a loss function may read besides the model and the batch."""

    rng: jax.Array  # a fresh key for this (micro-)batch
    step: jax.Array  # the optimizer step being computed
    extras: Any = None  # task state carried in TrainState.extras (e.g. reference params)


LossFn = Callable[[Any, dict, StepContext], LossOutput]


class BatchSource(Protocol):
    def next(self, state) -> tuple[dict[str, np.ndarray], dict[str, float]]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...

    def close(self) -> None: ...


Evaluator = Callable[[Any], dict[str, float]]


@dataclasses.dataclass
class RunContext:
    """What tasks may use while building: config, mesh, tokenizer, and the run's pieces.

    The loop fills ``state_shardings`` once the train state exists (before evaluators are
    made) and ``summary`` with anything the task wants reported (e.g. data counts).
    """

    config: Any
    mesh: jax.sharding.Mesh
    rules: dict
    output_dir: str
    tokenizer: Any = None
    state_shardings: Any = None
    summary: dict = dataclasses.field(default_factory=dict)
    cache: dict = dataclasses.field(default_factory=dict)  # for tasks to share work

    @property
    def task_config(self):
        return getattr(self.config, self.config.task)

    @property
    def is_main_process(self) -> bool:
        return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class Task:
    """A post-training job, as the loop sees it (see the module docstring)."""

    name: str
    description: str
    config_cls: type  # the dataclass of this task's config section
    build: Callable[[RunContext], tuple[Any, Any]]  # -> (nnx model, extras pytree or None)
    make_loss: Callable[[RunContext], LossFn]  # the pure loss, config options bound
    make_train_source: Callable[[RunContext], BatchSource]
    make_evaluator: Callable[[RunContext], Evaluator | None]
    export: Callable[[RunContext, Any, str], None]  # (ctx, TrainState, out_dir)


def safe_ratio(numerator, denominator):
    """numerator / denominator, 0 where the denominator is 0."""
    denominator = jnp.asarray(denominator, jnp.float32)
    return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1e-30), 0.0)


def loss_evaluator(ctx: RunContext, loss_fn: LossFn, batches: list[dict]) -> Evaluator:
    """An evaluator reporting ``eval_loss`` (and ``eval_<metric>``) of ``loss_fn`` over fixed
    host batches: sums accumulate on device and are fetched once per evaluation."""
    from jaxpt.step import make_eval_step, put_batch

    eval_step = make_eval_step(loss_fn, ctx.mesh, ctx.state_shardings, batches[0])
    device_batches = [put_batch(b, ctx.mesh) for b in batches]

    def evaluate(state) -> dict[str, float]:
        total = None
        for batch in device_batches:
            out = eval_step(state, batch)
            total = out if total is None else jax.tree.map(jnp.add, total, out)
        total = jax.device_get(total)
        result = {"eval_loss": float(safe_ratio(total.numerator, total.denominator))}
        for name, value in total.metrics.items():
            result[f"eval_{name}"] = float(safe_ratio(value, total.denominator))
        for name, value in total.totals.items():
            result[f"eval_{name}"] = float(value)
        return result

    return evaluate
