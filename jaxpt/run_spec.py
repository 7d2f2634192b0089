"""One description of a run, shared by training, memory plans and benchmarks: its mesh
(``run_mesh``), its optimizer with every wrapper (``run_optimizer``), the train state's
shapes and shardings (``jaxpt.state.train_state_shapes``), the frozen reference
(``jaxpt.tasks.common.keeps_reference``), one train batch (``Task.batch_spec``) and the
jitted train step (``jit_run_step``).

``jaxpt.loop.setup`` builds a concrete run from it. ``abstract_run`` builds the same run as
sharded ``ShapeDtypeStruct``s from the model's architecture alone (``Task.build_abstract``:
no weights are read or created), so ``python -m jaxpt.plan`` and ``python -m jaxpt.bench
memory`` compile the very program the loop runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from jaxpt.config import ConfigError
from jaxpt.models import state_shardings
from jaxpt.models.lora import trainable_filter
from jaxpt.optim import make_optimizer, scale_updates
from jaxpt.sharding import batch_sharding, batch_shards, make_mesh
from jaxpt.state import TrainState, shardings_of, train_state_shapes
from jaxpt.step import (
    LossFn,
    count_nonfinite,
    jit_train_step,
    make_train_step,
    with_router_losses,
)
from jaxpt.tasks import RunContext, Task, available_tasks, common, get_task


def run_mesh(config, devices=None) -> jax.sharding.Mesh:
    """The mesh ``config.mesh`` describes over ``devices`` (default: every device), or over
    their train part in a split RL run (``jaxpt.tasks.rl.placement``)."""
    from jaxpt.tasks.rl.placement import train_devices

    m = config.mesh
    devices = train_devices(config, devices if devices is not None else jax.devices())
    return make_mesh(m.axis_sizes(), devices=devices, dcn_data=m.dcn_data)


def check_batch_fits_mesh(config, mesh) -> None:
    """A ConfigError unless the global batch splits evenly into micro-batches over the
    mesh's batch shards (under the active sharding rules)."""
    train = config.train
    shards = batch_shards(mesh)
    if train.batch_size % (shards * train.grad_accum_steps):
        raise ConfigError(
            f"config key 'train.batch_size' ({train.batch_size}) must be divisible "
            f"by the mesh's batch shards ({shards}) times 'train.grad_accum_steps' "
            f"({train.grad_accum_steps})"
        )


def run_optimizer(ctx: RunContext, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) of a run: the ``optim`` section's optimizer, scaled per parameter by
    the task's ``update_scales`` (if any), its state also counting skipped (non-finite)
    steps (``count_nonfinite``). ``params`` are the trained params, concrete or abstract."""
    tx, schedule = make_optimizer(ctx.config.optim, ctx.config.train.max_steps)
    task = get_task(ctx.config.task)
    if task.update_scales is not None:
        tx = optax.chain(tx, scale_updates(task.update_scales(ctx, params)))
    return count_nonfinite(tx), schedule  # the counts are checkpointed with the state


def jit_run_step(
    ctx: RunContext,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    example_batch: dict,
) -> Callable:
    """The loop's jitted train step ``(state, batch) -> (state, metrics)``: ``loss_fn`` with
    ``train.grad_accum_steps`` micro-batches and the lr schedule's metric, in and out on
    ``ctx.state_shardings`` with the state donated, batches shaped like ``example_batch``
    (host arrays or ShapeDtypeStructs). Use it under the run's mesh and rules."""
    model_cfg = ctx.config.model
    loss_fn = with_router_losses(loss_fn, model_cfg.moe_aux_loss_weight, model_cfg.moe_z_loss_weight)
    step = make_train_step(loss_fn, tx, ctx.config.train.grad_accum_steps, schedule=schedule)
    return jit_train_step(step, ctx.mesh, ctx.state_shardings, example_batch)


# ------------------------------------------------------------------ without data or weights


def describes_runs(task: Task) -> bool:
    """Whether runs of ``task`` can be described without data or weights."""
    return task.batch_spec is not None and task.build_abstract is not None


def planned_tasks() -> list[str]:
    """The tasks that memory plans and the memory benchmark cover."""
    return [name for name in available_tasks() if describes_runs(get_task(name))]


def _described_task(config) -> Task:
    task = get_task(config.task)
    if not describes_runs(task):
        raise ConfigError(
            f"config key 'task': memory plans cover {', '.join(planned_tasks())}, not "
            f"{config.task!r} (its Task has no batch_spec and build_abstract)"
        )
    return task


def abstract_batch(config, mesh) -> dict:
    """One global train batch (``Task.batch_spec``) as ShapeDtypeStructs on the batch
    sharding of ``mesh`` (under the active sharding rules)."""
    spec = _described_task(config).batch_spec(config)
    return {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
        for name, (shape, dtype) in spec.items()
    }


def _sharded(state, mesh, rules):
    """An abstract ``nnx.State`` with each Variable sharded by its logical axes, as the
    model loaders place them."""
    if state is None:
        return None
    shardings = state_shardings(state, mesh, rules)
    return jax.tree.map(
        lambda var, s: var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=s)),
        state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def abstract_model(ctx: RunContext, hf_config: dict | None = None):
    """(graphdef, params, rest, ref_params) of the run's model, abstract and sharded on
    ``ctx.mesh``: ``Task.build_abstract`` of ``hf_config`` (default: ``model.path``'s),
    split as ``jaxpt.state.create_train_state`` splits it (under LoRA ``params`` are the
    adapters and the frozen base rides in ``rest``)."""
    task = _described_task(ctx.config)
    if hf_config is None:
        hf_config = common.hf_config_dict(ctx.config.model.path)

    def build():
        built = task.build_abstract(ctx, hf_config)
        return built.model, built.ref_params

    model, ref_params = nnx.eval_shape(build)
    graphdef, params, rest = nnx.split(model, trainable_filter(model), ...)
    mesh, rules = ctx.mesh, ctx.rules
    return (graphdef, _sharded(params, mesh, rules), _sharded(rest, mesh, rules),
            _sharded(ref_params, mesh, rules))


@dataclasses.dataclass
class AbstractRun:
    """A run as ``jaxpt.loop.setup`` would create it, with sharded ShapeDtypeStructs for
    arrays: what plans and benchmarks compile."""

    ctx: RunContext  # with ``state_shardings``
    state: TrainState
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    batch: dict  # name -> sharded ShapeDtypeStruct

    @property
    def state_shardings(self) -> Any:
        return self.ctx.state_shardings

    def jit_step(self) -> Callable:
        """The loop's jitted train step for this run (``jit_run_step``), to lower on
        ``(self.state, self.batch)`` under the run's mesh and rules."""
        loss_fn = get_task(self.ctx.config.task).make_loss(self.ctx)
        return jit_run_step(self.ctx, loss_fn, self.tx, self.schedule, self.batch)


def abstract_run(config, mesh, rules, *, hf_config: dict | None = None) -> AbstractRun:
    """The run ``jaxpt.loop.setup`` would create for ``config`` on ``mesh`` (same optimizer,
    state shardings, reference and batch), from the architecture ``hf_config`` (default:
    ``model.path``'s) alone. Call it under ``use_rules(rules)``, outside ``jax.set_mesh``
    (optax builds its state tree eagerly, and a TPU topology's devices run nothing)."""
    _described_task(config)
    check_batch_fits_mesh(config, mesh)
    ctx = RunContext(config, mesh, rules, os.path.abspath(config.output_dir))
    graphdef, params, rest, ref_params = abstract_model(ctx, hf_config)
    tx, schedule = run_optimizer(ctx, params)
    state = train_state_shapes(graphdef, params, rest, tx, mesh, ref_params=ref_params)
    ctx.state_shardings = shardings_of(state)
    return AbstractRun(ctx, state, tx, schedule, abstract_batch(config, mesh))
