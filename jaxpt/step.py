"""The pure train step (with exact gradient accumulation) and the eval step.

See ``jaxpt.tasks.base`` for the loss contract: a task's loss returns numerator and
denominator sums; the step divides only after summing over all micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpt.sharding import batch_sharding, replicated
from jaxpt.state import TrainState
from jaxpt.tasks.base import LossFn, LossOutput, StepContext, safe_ratio


def _split_micro(batch: dict, k: int) -> dict:
    """[B, ...] -> [k, B/k, ...]: micro-batch i takes rows i*B/k..(i+1)*B/k - 1."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch dim {x.shape[0]} not divisible by grad_accum_steps={k}")
        return x.reshape(k, x.shape[0] // k, *x.shape[1:])

    return jax.tree.map(split, batch)


def _sums_and_grads(loss_fn: LossFn, state: TrainState, batch: dict, k: int):
    """(LossOutput summed over k micro-batches, grads of the summed numerator)."""
    key = jax.random.fold_in(state.key, state.step)

    def numerator(params, micro, micro_key):
        out = loss_fn(state.model(params), micro, StepContext(micro_key, state.step, state.extras))
        return out.numerator, out

    grad_fn = jax.grad(numerator, has_aux=True)
    if k == 1:
        grads, out = grad_fn(state.params, batch, key)
        return out, grads

    micro_batches = _split_micro(batch, k)
    keys = jax.random.split(key, k)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    out_shape = jax.eval_shape(lambda: grad_fn(state.params, first, keys[0]))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

    def body(carry, xs):
        micro, micro_key = xs
        grads, out = grad_fn(state.params, micro, micro_key)
        return jax.tree.map(jnp.add, carry, (grads, out)), None

    (grads, out), _ = jax.lax.scan(body, zeros, (micro_batches, keys))
    return out, grads


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    grad_accum_steps: int = 1,
    *,
    schedule: optax.Schedule | None = None,
):
    """A pure ``(state, batch) -> (state, metrics)``; jit it with ``jit_train_step``.

    Metrics (device scalars): loss, grad_norm (before clipping), lr, ``<metric>`` as
    sum / denominator, ``<total>`` as totals, and ``denominator``.
    """

    def train_step(state: TrainState, batch: dict):
        out, grads = _sums_and_grads(loss_fn, state, batch, grad_accum_steps)
        scale = safe_ratio(1.0, out.denominator)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": safe_ratio(out.numerator, out.denominator),
            "grad_norm": optax.tree.norm(grads),
            "denominator": out.denominator.astype(jnp.float32),
        }
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        metrics.update({k: safe_ratio(v, out.denominator) for k, v in out.metrics.items()})
        metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in out.totals.items()})
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    return train_step


def batch_shardings(mesh, batch: dict):
    """Each batch array sharded on its leading dim over the data axes."""
    return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def put_batch(batch: dict, mesh) -> dict:
    """Host numpy batch (this process's rows) -> global jax arrays on the batch sharding."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }


def jit_train_step(train_step, mesh, state_shardings, example_batch: dict):
    """Jit with explicit shardings; the state's buffers are donated (updated in place)."""
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings(mesh, example_batch)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )


def make_eval_step(loss_fn: LossFn, mesh, state_shardings, example_batch: dict):
    """Jitted ``(state, batch) -> LossOutput`` sums (no gradient, nothing donated)."""

    def eval_step(state: TrainState, batch: dict) -> LossOutput:
        key = jax.random.fold_in(state.key, state.step)
        return loss_fn(state.model(), batch, StepContext(key, state.step, state.extras))

    return jax.jit(
        eval_step,
        in_shardings=(state_shardings, batch_shardings(mesh, example_batch)),
        out_shardings=replicated(mesh),
    )
