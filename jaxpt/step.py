"""The loss contract, the pure train step (with exact gradient accumulation) and the eval step.

``loss_fn(model, batch, step_ctx) -> LossOutput`` returns *sums*, never means:

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jaxpt.models.lora import enable_dropout
from jaxpt.models.moe import (
    collect_router_stats,
    layer_load_balancing_losses,
    load_balancing_loss,
    router_z_loss,
    take_router_stats,
)
from jaxpt.sharding import batch_sharding, process_rows, replicated
from jaxpt.state import TrainState


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
    ref_params: nnx.State | None = None  # the frozen reference (DPO, GRPO, PPO), if any
    extras: Any = None  # other task state carried in TrainState.extras


LossFn = Callable[[Any, dict, StepContext], LossOutput]


def safe_ratio(numerator, denominator):
    """numerator / denominator, 0 where the denominator is 0."""
    denominator = jnp.asarray(denominator, jnp.float32)
    return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1e-30), 0.0)


def _checkpoint_aux_coef(model) -> float:
    for _, node in nnx.iter_graph(model):
        config = getattr(node, "config", None)
        if getattr(config, "num_experts", 0):
            return float(config.router_aux_loss_coef)
    return 0.0


def with_router_losses(loss_fn: LossFn, aux_weight: float | None = None,
                       z_weight: float = 0.0) -> LossFn:
    """``loss_fn`` plus, for a mixture-of-experts model, its router losses: the
    load-balancing loss (``aux_weight``; None: the checkpoint's ``router_aux_loss_coef``)
    and the router z-loss (``z_weight``), each a mean over the micro-batch's real tokens
    and layers (``jaxpt.models.moe``), added per unit of the task's loss:
    ``numerator += denominator * (aux_weight * aux + z_weight * z)``. Only the trained
    model's forwards count (not a reference's). Metrics: ``moe_aux_loss``, ``moe_z_loss``,
    ``moe_aux_loss/layer_{i}``; totals: ``moe_tokens_per_expert/{e}`` (top-k picks of real
    tokens, averaged over layers). A dense model's loss is returned unchanged."""

    def loss_with_router_losses(model, batch: dict, ctx: StepContext) -> LossOutput:
        with collect_router_stats() as sink:
            out = loss_fn(model, batch, ctx)
        stats = take_router_stats(model, sink)
        if stats is None:
            return out
        aux_w = _checkpoint_aux_coef(model) if aux_weight is None else aux_weight
        aux, z = load_balancing_loss(stats), router_z_loss(stats)
        units = jax.lax.stop_gradient(out.denominator).astype(jnp.float32)
        numerator = out.numerator + units * (aux_w * aux + z_weight * z)
        metrics = {**out.metrics, "moe_aux_loss": units * aux, "moe_z_loss": units * z}
        for i, layer_aux in enumerate(layer_load_balancing_losses(stats)):
            metrics[f"moe_aux_loss/layer_{i}"] = units * layer_aux
        per_expert = jnp.mean(stats.expert_tokens, axis=0)
        totals = {**out.totals}
        for e in range(per_expert.shape[0]):
            totals[f"moe_tokens_per_expert/{e}"] = per_expert[e]
        return out.replace(numerator=numerator, metrics=metrics, totals=totals)

    return loss_with_router_losses


def step_context(state: TrainState, rng: jax.Array) -> StepContext:
    return StepContext(rng, state.step, state.ref_params, state.extras)


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
        # Fresh Variables at this trace level: a frozen base in ``rest`` (LoRA) must be
        # writable by transforms inside the loss (nnx.remat writes its outputs back).
        model = nnx.merge(state.graphdef, params, state.rest, copy=True)
        # LoRA dropout, train steps only; its key is kept apart from the loss's own.
        enable_dropout(model, jax.random.fold_in(micro_key, 0x10AA))
        out = loss_fn(model, micro, step_context(state, micro_key))
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

    A step whose loss or gradient is not all finite is skipped: params and optimizer state
    come back bit-identical (selected inside the program, as ``optax.apply_if_finite``
    does), only ``step`` advances (its batch was consumed). With ``tx`` wrapped by
    ``count_nonfinite`` the optimizer state also counts skipped steps, so the counts are
    checkpointed and survive a resume.

    Metrics (device scalars): loss, grad_norm (before clipping), lr, ``<metric>`` as
    sum / denominator, ``<total>`` as totals, ``denominator``, ``nonfinite`` (1.0 if this
    step was skipped) and, with ``count_nonfinite``, ``nonfinite_steps`` (skipped so far)
    and ``nonfinite_consecutive`` (skipped since the last finite step).
    """

    def train_step(state: TrainState, batch: dict):
        out, grads = _sums_and_grads(loss_fn, state, batch, grad_accum_steps)
        scale = safe_ratio(1.0, out.denominator)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        loss = safe_ratio(out.numerator, out.denominator)
        grad_norm = optax.tree.norm(grads)  # NaN or inf if any gradient entry is
        # Known before the update, so the select below fuses into it (no extra pass over
        # params and moments); updates from finite gradients are finite (Adam's are ~lr).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The optimizer's own counters (Adam's bias correction, its schedule) stay with the
        # last finite step too; the reported lr follows ``state.step``.
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (params, opt_state),
            (state.params, state.opt_state),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "denominator": out.denominator.astype(jnp.float32),
            "nonfinite": jnp.where(finite, 0.0, 1.0),
        }
        if isinstance(opt_state, NonFiniteCounts):
            opt_state = opt_state.record(finite)
            metrics["nonfinite_steps"] = opt_state.total.astype(jnp.float32)
            metrics["nonfinite_consecutive"] = opt_state.consecutive.astype(jnp.float32)
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        metrics.update({k: safe_ratio(v, out.denominator) for k, v in out.metrics.items()})
        metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in out.totals.items()})
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    return train_step


def all_finite(tree) -> jax.Array:
    """A scalar bool: every entry of every array in ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class NonFiniteCounts(NamedTuple):
    """An optimizer state with counts of skipped (non-finite) train steps beside it."""

    inner: optax.OptState
    total: jax.Array  # int32: steps skipped so far
    consecutive: jax.Array  # int32: steps skipped since the last finite one

    def record(self, finite: jax.Array) -> NonFiniteCounts:
        skipped = jnp.logical_not(finite).astype(jnp.int32)
        return self._replace(
            total=self.total + skipped, consecutive=(self.consecutive + skipped) * skipped
        )


def count_nonfinite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` whose state also holds ``NonFiniteCounts``; ``make_train_step`` updates the
    counts (the transformation itself only passes them through)."""

    def init(params):
        zero = jnp.zeros((), jnp.int32)
        return NonFiniteCounts(tx.init(params), zero, zero)

    def update(updates, state: NonFiniteCounts, params=None):
        updates, inner = tx.update(updates, state.inner, params)
        return updates, state._replace(inner=inner)

    return optax.GradientTransformation(init, update)


def batch_shardings(mesh, batch: dict):
    """Each batch array sharded on its leading dim over the data axes."""
    return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def local_rows(batch: dict, mesh=None) -> dict:
    """This process's rows of a global host batch (one every process holds alike), as
    ``put_batch`` takes them; ``mesh`` defaults to the current one (``jax.set_mesh``)."""
    if jax.process_count() == 1:
        return batch
    mesh = jax.sharding.get_mesh() if mesh is None else mesh
    if mesh.empty:
        raise ValueError("selecting this process's batch rows needs a mesh (jax.set_mesh)")
    rows = process_rows(mesh, len(next(iter(batch.values()))))
    return {k: np.asarray(v)[rows] for k, v in batch.items()}


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
        return loss_fn(state.model(), batch, step_context(state, key))

    return jax.jit(
        eval_step,
        in_shardings=(state_shardings, batch_shardings(mesh, example_batch)),
        out_shardings=replicated(mesh),
    )


Evaluator = Callable[[TrainState], dict[str, float]]


def loss_evaluator(mesh, state_shardings, loss_fn: LossFn, batches: list[dict]) -> Evaluator:
    """An evaluator reporting ``eval_loss`` (and ``eval_<metric>``) of ``loss_fn`` over fixed
    host batches: sums accumulate on device and are fetched once per evaluation."""
    eval_step = make_eval_step(loss_fn, mesh, state_shardings, batches[0])
    device_batches = [put_batch(b, mesh) for b in batches]

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
