"""The train state pytree and its sharded initialization."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxpt.models.lora import has_adapters, trainable_filter, without_adapters
from jaxpt.sharding import replicated


@struct.dataclass
class TrainState:
    """Everything a train step reads and writes; the graphdef is static (not a leaf).

    ``params`` are the trained ``nnx.Param``s (f32 master weights; under LoRA only the
    adapters' ``LoRAParam``s), ``rest`` any other model variables (under LoRA also the
    frozen base weights), ``rng`` raw uint32 key data (checkpoint friendly), ``ref_params``
    the frozen reference params of DPO/GRPO/PPO (never differentiated, no optimizer state;
    None unless ``jaxpt.tasks.common.keeps_reference``), ``extras`` any other task state.
    Checkpoints leave the frozen weights (reference, LoRA base) out: a resumed run re-reads
    them from their source (see ``jaxpt.checkpoint``).
    """

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array
    ref_params: nnx.State | None = None
    extras: Any = None

    def model(self, params: nnx.State | None = None):
        """The NNX module with ``params`` (default: this state's)."""
        return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def opt_state_shardings(tx: optax.GradientTransformation, params, mesh):
    """Shardings of ``tx``'s state: moments like their params, scalars replicated."""
    abstract = jax.eval_shape(tx.init, params)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def train_state_shapes(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    ref_params: nnx.State | None = None,
    extras: Any = None,
) -> TrainState:
    """The TrainState of a model split into ``(graphdef, params, rest)`` as sharded
    ``ShapeDtypeStruct``s: what ``create_train_state`` allocates, and what memory plans and
    benchmarks compile the train step on (``jaxpt.run_spec``).

    ``params``, ``rest``, ``ref_params`` and ``extras`` keep their leaves' shardings (arrays,
    or ShapeDtypeStructs that carry one); ``tx``'s moments shard like their params, its
    counters, ``step`` and ``rng`` are replicated.
    """
    params = abstract_like(params)
    opt_state = abstract_like(
        jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, mesh)
    )
    scalar = replicated(mesh)
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return TrainState(
        graphdef, params, abstract_like(rest), opt_state,
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar),
        rng=jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=scalar),
        ref_params=abstract_like(ref_params), extras=abstract_like(extras),
    )


def create_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    seed: int = 0,
    ref_params: nnx.State | None = None,
    extras: Any = None,
) -> TrainState:
    """A TrainState around an already-sharded model, laid out as ``train_state_shapes``.

    The optimizer state is created by ``jax.jit(tx.init, out_shardings=...)`` with those
    shapes' shardings, so Adam moments shard exactly like their params (on an Auto mesh
    they would otherwise come out replicated).
    """
    # Under LoRA only the adapters train; the frozen base rides in ``rest``.
    graphdef, params, rest = nnx.split(model, trainable_filter(model), ...)
    shapes = train_state_shapes(graphdef, params, rest, tx, mesh)
    opt_state = jax.jit(tx.init, out_shardings=shardings_of(shapes.opt_state))(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), shapes.rng.sharding)
    step = jax.device_put(jnp.zeros((), jnp.int32), shapes.step.sharding)
    return TrainState(graphdef, params, rest, opt_state, step, rng, ref_params, extras)


def with_params(model: nnx.Module, params: nnx.State) -> nnx.Module:
    """``model``'s graph and non-param variables with ``params`` swapped in, gradient-stopped
    (how a loss runs the frozen reference through the policy's architecture)."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, params), rest)


def reference_model(model: nnx.Module, ref_params: nnx.State | None) -> nnx.Module:
    """The frozen reference a loss compares ``model`` with: ``model``'s architecture with
    ``ref_params``, or, under LoRA with no reference params kept, ``model`` with its
    adapters removed (the base weights, not a copy of them)."""
    if ref_params is not None:
        return with_params(model, ref_params)
    if not has_adapters(model):
        raise ValueError("no reference: the train state keeps no reference params and the "
                         "model has no LoRA adapters to switch off")
    return without_adapters(model)


def copy_params(model: nnx.Module) -> nnx.State:
    """A copy of ``model``'s params in their own buffers, shardings kept: a frozen reference
    that the donated train state can never alias."""
    params = nnx.state(model, nnx.Param)
    return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings_of(params))(params)


def shardings_of(tree):
    """The tree of shardings of a tree of (committed) jax arrays or sharded
    ShapeDtypeStructs."""
    return jax.tree.map(lambda x: x.sharding, tree)


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs (with shardings) of a tree, e.g. the target of a restore."""
    shardings = shardings_of(tree) if shardings is None else shardings
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def num_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
