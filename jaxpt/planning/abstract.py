"""A run's train state, batches and rollout inputs as sharded ``ShapeDtypeStruct``s: the
shapes ``jaxpt.loop.setup`` would allocate, derived from the model's HF config alone
(no weights are read or created)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.config import ConfigError
from jaxpt.models import init_model, preset_config, state_shardings
from jaxpt.models.lora import trainable_filter
from jaxpt.optim import make_optimizer
from jaxpt.sharding import batch_sharding, replicated
from jaxpt.state import TrainState, opt_state_shardings
from jaxpt.step import count_nonfinite
from jaxpt.tasks import RunContext, common

PLANNED_TASKS = ("sft", "grpo")


def hf_config_dict(path: str) -> dict:
    """The HF config of ``model.path``: a preset, or ``config.json`` of a local directory."""
    config = preset_config(path)
    if config is not None:
        return config
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ConfigError(
            f"config key 'model.path': {path!r} is neither a preset nor a directory with a "
            "config.json (a memory plan needs the architecture only, not the weights)"
        )
    with open(file) as f:
        return json.load(f)


def _with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _sharded_state(state, mesh, rules):
    """An abstract ``nnx.State`` with each Variable's value sharded by its logical axes."""
    shardings = state_shardings(state, mesh, rules)
    return jax.tree.map(
        lambda var, s: var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=s)),
        state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


@dataclasses.dataclass
class AbstractRun:
    """What a plan compiles: the train state, one batch, and the pieces around them."""

    ctx: RunContext
    state: TrainState  # leaves are sharded ShapeDtypeStructs
    state_shardings: object
    tx: object
    schedule: object
    batch: dict  # name -> sharded ShapeDtypeStruct


def abstract_model(ctx: RunContext):
    """(graphdef, params, rest) of the run's model, abstract and sharded on ``ctx.mesh``.
    Under LoRA ``params`` are the adapters and the frozen base rides in ``rest``, as in
    ``jaxpt.state.create_train_state``."""
    kwargs = common.model_kwargs(ctx)
    hf = hf_config_dict(ctx.config.model.path)
    # Adapters are placed by their logical axes below, not on the (maybe remote) mesh.
    unplaced = dataclasses.replace(ctx, mesh=None)

    def build():
        model = init_model(hf, **kwargs)
        common.attach_lora(unplaced, model)
        return model

    model = nnx.eval_shape(build)
    graphdef, params, rest = nnx.split(model, trainable_filter(model), ...)
    return graphdef, _sharded_state(params, ctx.mesh, ctx.rules), _sharded_state(
        rest, ctx.mesh, ctx.rules
    )


def abstract_batch(config, mesh) -> dict:
    """One global train batch as the task's batch source makes it (shapes and dtypes)."""
    b = config.train.batch_size
    if config.task == "sft":
        t = config.data.seq_len
        names = {"input_ids": jnp.int32, "target_ids": jnp.int32, "positions": jnp.int32,
                 "segment_ids": jnp.int32, "loss_mask": jnp.float32}
    elif config.task == "grpo":
        t = config.grpo.max_prompt_length + config.grpo.max_completion_length
        names = {"input_ids": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32,
                 "target_ids": jnp.int32, "completion_mask": jnp.float32,
                 "old_logprobs": jnp.float32}
    else:
        raise ConfigError(
            f"config key 'task': memory plans cover {', '.join(PLANNED_TASKS)}, "
            f"not {config.task!r}"
        )
    batch = {k: jax.ShapeDtypeStruct((b, t), d, sharding=batch_sharding(mesh, 2))
             for k, d in names.items()}
    if config.task == "grpo":
        from jaxpt.tasks.grpo import carries_reference_logprobs

        batch["advantages"] = jax.ShapeDtypeStruct((b,), jnp.float32,
                                                   sharding=batch_sharding(mesh, 1))
        if carries_reference_logprobs(config.grpo):  # the step runs no reference forward
            batch["ref_logprobs"] = jax.ShapeDtypeStruct(
                (b, config.grpo.max_completion_length), jnp.float32,
                sharding=batch_sharding(mesh, 2),
            )
    return batch


def abstract_run(config, mesh, rules) -> AbstractRun:
    """The train state ``jaxpt.loop.setup`` would create for ``config`` on ``mesh``, with
    the same optimizer, shardings and reference params, as abstract values."""
    if config.task not in PLANNED_TASKS:
        abstract_batch(config, mesh)  # raises the ConfigError
    ctx = RunContext(config, mesh, rules, os.path.abspath(config.output_dir))
    graphdef, params, rest = abstract_model(ctx)
    tx, schedule = make_optimizer(config.optim, config.train.max_steps)
    tx = count_nonfinite(tx)
    opt_state = _with_shardings(
        jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, mesh)
    )
    scalar = replicated(mesh)
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = TrainState(
        graphdef, params, rest, opt_state,
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar),
        rng=jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=scalar),
        ref_params=params if common.keeps_reference(config) else None,
    )
    shardings = jax.tree.map(lambda x: x.sharding, state)
    ctx.state_shardings = shardings
    return AbstractRun(ctx, state, shardings, tx, schedule, abstract_batch(config, mesh))


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total
