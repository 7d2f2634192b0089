"""The task interface: what the one training loop needs from SFT, RM, DPO, GRPO, PPO.

A task is a ``Task`` record of plain functions, found by name in ``jaxpt.tasks``. The loop
calls them in a fixed order and never branches on the task:

    built = task.build(ctx)                         # the model, its reference, task state
    loss_fn = task.make_loss(ctx)                   # pure LossFn with the task's options bound
    source = task.make_train_source(ctx)            # BatchSource: next(state) -> (batch, host)
    evaluate = task.make_evaluator(ctx)             # (state) -> {"eval_loss": ...} or None
    ... train_step(state, batch) calls loss_fn(model, micro_batch, step_ctx) ...
    task.export(ctx, state, out_dir)                # e.g. an HF checkpoint + tokenizer

The loss contract (``LossOutput``, ``StepContext``) lives with the train step in
``jaxpt.step``.

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
import numpy as np

from jaxpt.step import LossFn


@dataclasses.dataclass
class BuiltModel:
    """What ``Task.build`` returns: the trained module, the frozen reference params (DPO,
    GRPO, PPO; present exactly when ``common.keeps_reference`` says) and any other task
    state."""

    model: Any
    ref_params: Any = None
    extras: Any = None


class BatchSource(Protocol):
    def next(self, state) -> tuple[dict[str, np.ndarray], dict[str, float]]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...

    def close(self) -> None: ...


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
    build: Callable[[RunContext], BuiltModel]
    make_loss: Callable[[RunContext], LossFn]  # the pure loss, config options bound
    make_train_source: Callable[[RunContext], BatchSource]
    make_evaluator: Callable[[RunContext], Callable | None]  # (state) -> {name: value}
    export: Callable[[RunContext, Any, str], None]  # (ctx, TrainState, out_dir)
    # Load-time checks across sections (root config -> None, raises ConfigError).
    check_config: Callable[[Any], None] | None = None
    # Per-parameter multipliers of the optimizer's updates, a tree like the params (e.g.
    # PPO's critic learning rate): (ctx, params) -> tree of floats; None: all 1.
    update_scales: Callable[[RunContext, Any], Any] | None = None
    # Whether the loss compares against a frozen reference model for this root config
    # (config -> bool); None: never. ``common.keeps_reference`` adds the LoRA rule.
    uses_reference: Callable[[Any], bool] | None = None
    # Whether that reference is the policy's own starting point (then under LoRA the base
    # with its adapters off stands in for it); False for another model, such as a teacher.
    reference_is_policy: bool = True
    # The arrays of one global train batch as the batch source makes them: root config ->
    # {name: (shape, numpy dtype)}. With ``build_abstract`` it lets memory plans and
    # benchmarks compile the train step without data (``jaxpt.run_spec``); None: not planned.
    batch_spec: Callable[[Any], dict[str, tuple[tuple[int, ...], Any]]] | None = None
    # ``build`` from the architecture alone: (ctx, HF config dict) -> BuiltModel with the
    # same variables and reference, traced by ``nnx.eval_shape`` (no weights are read or
    # created); e.g. ``common.abstract_causal_lm``.
    build_abstract: Callable[[RunContext, dict], BuiltModel] | None = None
