"""The mixture-of-experts block (Qwen3-MoE, Mixtral): a router and dropless grouped experts.

Each token's router logits (float32) pick ``experts_per_token`` experts: softmax over all
experts, the top k, renormalized when ``norm_topk_prob`` (Mixtral's "softmax over the top-k
logits" is the same thing). The block then runs in four steps, each its own function so
that expert parallelism can replace the middle ones (an all-to-all around the grouped
matmuls) without touching the rest:

    route     logits [N, E] -> weights [N, k], experts [N, k]
    dispatch  tokens sorted by expert: inputs [N*k, D], group sizes [E], the order
    expert_ffn  ``jax.lax.ragged_dot`` over the groups: gate/up [E, F, D], down [E, D, F]
    combine   unsort, weight by the routing weights, sum over the k picks -> [N, D]

No token is dropped (no capacity factor) and nothing loops over experts in Python. The
expert weights keep transformers' layout per expert ([out, in]) stacked on a leading
``expert`` logical axis (and, in the decoder, on ``layers`` before it).

ROUTER STATISTICS. Inside ``collect_router_stats()`` every MoE block also records, over
the real tokens of its input (padding, segment id 0, excluded), how many of the top-k
picks went to each expert, the summed router probabilities and the summed squared
router log-normalizers (``RouterStats``); the decoder carries them out of its layer loop
(scan included) and hands each forward's per-layer stack to the context's sink, where
``take_router_stats(model, sink)`` sums those of ``model``'s own forwards (a reference
or teacher model called in the same loss is left out). Nothing is kept on the modules
beyond one layer call, so no traced value outlives its trace. The
load-balancing loss (``load_balancing_loss``, transformers' ``load_balancing_loss_func``)
and the router z-loss (``router_z_loss``) are computed from these sums, so micro-batches
and several forwards add up before the nonlinear step.

ROUTING REPLAY. Inside ``collect_routing()`` every MoE block also records the expert ids
its tokens were routed to, and the decoder hands each forward's stack ([L, B, T, k]
int32) to that context's list: what a sampler keeps of its rollout. A forward given such
ids (``CausalLM(..., routing=)``) routes each token to them instead of its own top k
(``route(..., experts_nk=)``): the routing weights are still the router's probabilities,
at the replayed experts, so the router keeps its gradient.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxpt.models.layers import BATCH_MAJOR, Layout, gated_activation
from jaxpt.sharding import active_rules, current_mesh

EXPERT_AXIS = "expert"  # logical axis of the experts' stacked dimension

_SINK = contextvars.ContextVar("jaxpt_router_stats", default=None)
_ROUTING = contextvars.ContextVar("jaxpt_routing", default=None)


@contextlib.contextmanager
def collect_router_stats():
    """While tracing a loss inside this context, MoE models' forwards record their
    per-layer ``RouterStats`` in the yielded sink (read it with ``take_router_stats``)."""
    sink: list = []
    token = _SINK.set(sink)
    try:
        yield sink
    finally:
        _SINK.reset(token)


def collecting() -> bool:
    return _SINK.get() is not None


def record_forward_stats(model, stats: RouterStats) -> None:
    """A model's forward hands its per-layer stats to the active sink."""
    _SINK.get().append((model, stats))


@dataclasses.dataclass
class _RoutingSink:
    forwards: list  # per forward: [L, B, T, k]
    blocks: list  # the blocks' [B, T, k] not yet taken by their layer's caller


@contextlib.contextmanager
def collect_routing():
    """While tracing inside this context, each MoE model forward appends the expert ids
    its tokens were routed to, [L, B, T, k] int32, to the yielded list (a dense model's
    forward appends nothing). Blocks hand their ids over in the context, not on the
    modules, so a model built outside a loop's trace records inside it."""
    sink = _RoutingSink([], [])
    token = _ROUTING.set(sink)
    try:
        yield sink.forwards
    finally:
        _ROUTING.reset(token)


def collecting_routing() -> bool:
    return _ROUTING.get() is not None


def pop_block_routing() -> jax.Array | None:
    """The expert ids [B, T, k] the last MoE block recorded (inside ``collect_routing``),
    taken by its layer's caller in the same trace; None outside or after a dense layer."""
    sink = _ROUTING.get()
    return sink.blocks.pop() if sink is not None and sink.blocks else None


def record_forward_routing(experts_lbtk) -> None:
    """A model's forward hands its per-layer expert ids to the active routing list."""
    _ROUTING.get().forwards.append(experts_lbtk)


@struct.dataclass
class RouterStats:
    """Sums over real tokens, per expert [..., E] or per router [...] (a leading layers
    axis once the decoder stacks them)."""

    expert_tokens: jax.Array  # top-k picks of each expert (not differentiable)
    expert_probs: jax.Array  # summed router probabilities of each expert
    z_sum: jax.Array  # summed logsumexp(router logits)^2
    tokens: jax.Array  # real tokens routed

    def __add__(self, other: RouterStats) -> RouterStats:
        return jax.tree.map(jnp.add, self, other)


def router_stats(logits_ne, experts_nk, valid_n) -> RouterStats:
    """``RouterStats`` of one router's float32 logits, its picks and the real-token mask."""
    num_experts = logits_ne.shape[-1]
    valid_n = valid_n.astype(jnp.float32)
    probs_ne = jax.nn.softmax(logits_ne, axis=-1)
    picks_nke = jax.nn.one_hot(experts_nk, num_experts, dtype=jnp.float32)
    expert_tokens = jnp.einsum("nke,n->e", picks_nke, valid_n)
    logz_n = jax.nn.logsumexp(logits_ne, axis=-1)
    return RouterStats(
        expert_tokens=jax.lax.stop_gradient(expert_tokens),
        expert_probs=jnp.einsum("ne,n->e", probs_ne, valid_n),
        z_sum=jnp.sum(jnp.square(logz_n) * valid_n),
        tokens=jnp.sum(valid_n),
    )


def _ratio(num, den):
    return num / jnp.maximum(den, 1.0)


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """Switch/Mixtral load-balancing loss, as transformers' ``load_balancing_loss_func``
    computes it: over every layer's routed real tokens pooled, ``E * sum_e f_e * P_e`` with
    ``f_e`` the share of top-k picks per routed token and ``P_e`` the mean router
    probability. Per-layer stats ([L, E]) pool over the layers; one layer's give its own."""
    num_experts = stats.expert_tokens.shape[-1]
    tokens = jnp.sum(stats.tokens)
    fraction_e = _ratio(jnp.sum(stats.expert_tokens.reshape(-1, num_experts), axis=0), tokens)
    prob_e = _ratio(jnp.sum(stats.expert_probs.reshape(-1, num_experts), axis=0), tokens)
    return num_experts * jnp.sum(fraction_e * prob_e)


def layer_load_balancing_losses(stats: RouterStats) -> jax.Array:
    """Each layer's own load-balancing loss [L] from per-layer stats."""
    return jax.vmap(load_balancing_loss)(stats)


def router_z_loss(stats: RouterStats) -> jax.Array:
    """ST-MoE's router z-loss: mean over routed real tokens (and layers) of
    ``logsumexp(logits)^2``."""
    return _ratio(jnp.sum(stats.z_sum), jnp.sum(stats.tokens))


# ------------------------------------------------------------------------ the four steps


def route(logits_ne, k: int, normalize: bool, experts_nk=None):
    """Routing weights [N, k] (float32) and expert ids [N, k] of float32 router logits:
    softmax, top k, renormalized over the k when ``normalize``.

    ``experts_nk`` (int [N, k]) replays given expert ids instead of the top k: the weights
    are the softmax probabilities at those ids (renormalized alike), so they stay
    differentiable in the logits. A token whose ids hold a -1 (not recorded) takes its own
    top k. Replaying a forward's own top k gives exactly its weights."""
    probs_ne = jax.nn.softmax(logits_ne.astype(jnp.float32), axis=-1)
    weights_nk, top_nk = jax.lax.top_k(probs_ne, k)
    if experts_nk is None:
        experts_nk = top_nk
    else:
        replayed_n1 = jnp.all(experts_nk >= 0, axis=-1, keepdims=True)
        experts_nk = jnp.where(replayed_n1, experts_nk.astype(top_nk.dtype), top_nk)
        weights_nk = jnp.take_along_axis(probs_ne, experts_nk, axis=-1)
    if normalize:
        weights_nk = weights_nk / jnp.sum(weights_nk, axis=-1, keepdims=True)
    return weights_nk, experts_nk


def dispatch(x_nd, experts_nk, num_experts: int):
    """Each token copied once per pick, sorted by expert: (inputs [N*k, D], group sizes
    [E] int32, ``order`` [N*k]: the sorted row of each (token, pick) taken from)."""
    k = experts_nk.shape[-1]
    flat_m = experts_nk.reshape(-1)
    order_m = jnp.argsort(flat_m, stable=True)
    group_sizes_e = jnp.zeros((num_experts,), jnp.int32).at[flat_m].add(1)
    return x_nd[order_m // k], group_sizes_e, order_m


def grouped_matmul(x_mi, w_e, group_sizes_e, *, in_last: bool = True):
    """Rows of ``x`` grouped by expert (consecutive, ``group_sizes``) times their expert's
    weight, stored [E, out, in] (``in_last``) or [E, in, out]: [M, out], one
    ``ragged_dot``."""
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2 if in_last else 1]), ([], [])),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )
    return jax.lax.ragged_dot_general(x_mi, w_e, group_sizes_e, dims)


def combine(y_md, order_m, weights_nk):
    """Sorted expert outputs back to their tokens, weighted and summed over the picks."""
    n, k = weights_nk.shape
    # A gather through the inverse permutation (a scatter of [M] ints, not of [M, D] rows).
    inverse_m = jnp.zeros_like(order_m).at[order_m].set(jnp.arange(n * k, dtype=order_m.dtype))
    y_nkd = y_md[inverse_m].reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", y_nkd, weights_nk.astype(y_md.dtype))


# ----------------------------------------------------------------------------- modules


class ExpertLinear(nnx.Module):
    """One projection of every expert: weight [E, out, in], applied to rows grouped by
    expert. ``lora``: a per-expert low-rank adapter (``jaxpt.models.lora``)."""

    def __init__(self, num_experts, in_features, out_features, *, axes, rngs, std, dtype,
                 param_dtype):
        shape = (num_experts, out_features, in_features)
        self.weight = nnx.Param(
            std * jax.random.normal(rngs.params(), shape, param_dtype),
            logical_axes=(EXPERT_AXIS, *axes),
        )
        self.dtype = dtype
        self.lora = None

    def __call__(self, x_mi, group_sizes_e):
        x_mi = x_mi.astype(self.dtype)
        y_mo = grouped_matmul(x_mi, self.weight[...].astype(self.dtype), group_sizes_e)
        if self.lora is not None:
            y_mo = y_mo + self.lora.grouped(x_mi, group_sizes_e, self.dtype)
        return y_mo


class Experts(nnx.Module):
    """The experts' gated MLPs: ``down_e(act(gate_e(x)) * up_e(x))``."""

    def __init__(self, config, *, rngs, dtype, param_dtype):
        c = config
        e, d, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
        common = {"rngs": rngs, "std": c.initializer_range, "dtype": dtype,
                  "param_dtype": param_dtype}
        self.gate_proj = ExpertLinear(e, d, f, axes=("mlp", "embed"), **common)
        self.up_proj = ExpertLinear(e, d, f, axes=("mlp", "embed"), **common)
        self.down_proj = ExpertLinear(e, f, d, axes=("embed", "mlp"), **common)
        self.hidden_act = c.hidden_act

    def __call__(self, x_md, group_sizes_e):
        act = gated_activation(self.hidden_act)
        h_mf = act(self.gate_proj(x_md, group_sizes_e), self.up_proj(x_md, group_sizes_e))
        return self.down_proj(h_mf, group_sizes_e)


def expert_ffn(experts: Experts, x_md, group_sizes_e):
    """The grouped experts on dispatched rows (the step expert parallelism shards)."""
    return experts(x_md, group_sizes_e)


# ------------------------------------------------------------------ expert parallelism


def expert_shards(num_experts: int, num_tokens: int) -> str | None:
    """The mesh axis the experts are split over when the block should run expert-parallel
    (the current mesh has it with size > 1, the active rules map the ``expert`` logical
    axis to it alone, and it divides both the experts and the tokens); else None."""
    mesh = current_mesh()
    axis = active_rules().get(EXPERT_AXIS)
    axis = axis[0] if isinstance(axis, tuple) and len(axis) == 1 else axis
    if mesh is None or not isinstance(axis, str) or axis not in mesh.axis_names:
        return None
    size = mesh.shape[axis]
    if size == 1 or num_experts % size or num_tokens % size:
        return None
    return axis


def expert_parallel_ffn(experts: Experts, x_nd, experts_nk, weights_nk, num_experts: int,
                        axis: str):
    """Dispatch, expert_ffn and combine with the experts split over mesh axis ``axis``
    (S shards of E/S experts each), in a ``jax.shard_map`` manual over ``axis`` only (the
    other mesh axes stay automatic). Each shard holds N/S tokens, already routed: it
    all-gathers the S shards' tokens and picks, runs its own experts' grouped matmuls on
    the picks that chose them, combines those into partial outputs for all N tokens, and
    a reduce-scatter sums every shard's partials and hands each shard its own tokens'.
    Dropless: the grouped rows hold every pick of the S shards (the worst case, all on one
    shard's experts); a pick of another shard's expert contributes zero here.

    (``jax.lax.ragged_all_to_all``, which would move only the picks, is not implemented by
    XLA:CPU in jax 0.10, so this one scheme serves every backend.)"""
    graphdef, state = nnx.split(experts)

    def manual_spec(variable):  # only the expert-parallel axis is manual here
        ndim = jnp.ndim(variable.get_value())
        # trailing axes: inside a layer scan the metadata still names the stacked ``layers``
        logical = tuple(variable.get_metadata().get("logical_axes") or ())[-ndim:]
        return jax.P(*(axis if name == EXPERT_AXIS else None for name in logical))

    state_specs = jax.tree.map(manual_spec, state,
                               is_leaf=lambda v: isinstance(v, nnx.Variable))
    tokens = jax.P(axis)

    def local(x_nd, experts_nk, weights_nk, state):
        local_experts = num_experts // jax.lax.axis_size(axis)
        first = jax.lax.axis_index(axis) * local_experts
        x_nd = jax.lax.all_gather(x_nd, axis, tiled=True)  # [S*n, D]: every shard's tokens
        experts_nk = jax.lax.all_gather(experts_nk, axis, tiled=True)
        weights_nk = jax.lax.all_gather(weights_nk, axis, tiled=True)
        mine_nk = (experts_nk >= first) & (experts_nk < first + local_experts)
        # other shards' experts become one extra group, sorted last and never computed
        local_nk = jnp.where(mine_nk, experts_nk - first, local_experts)
        x_md, group_sizes, order_m = dispatch(x_nd, local_nk, local_experts + 1)
        y_md = expert_ffn(nnx.merge(graphdef, state), x_md, group_sizes[:-1])
        computed_m = jnp.arange(x_md.shape[0]) < jnp.sum(group_sizes[:-1])
        y_md = jnp.where(computed_m[:, None], y_md, 0)
        y_nd = combine(y_md, order_m, jnp.where(mine_nk, weights_nk, 0))
        return jax.lax.psum_scatter(y_nd, axis, tiled=True)

    run = jax.shard_map(local, mesh=current_mesh(), in_specs=(tokens, tokens, tokens,
                        state_specs), out_specs=tokens, axis_names={axis})
    return run(x_nd, experts_nk, weights_nk, state)


class Router(nnx.Module):
    """The router's linear map to one logit per expert, computed in float32."""

    def __init__(self, num_experts, dim, *, rngs, std, param_dtype):
        self.weight = nnx.Param(
            std * jax.random.normal(rngs.params(), (num_experts, dim), param_dtype),
            logical_axes=(None, "embed"),
        )

    def __call__(self, x_nd):
        w_ed = self.weight[...].astype(jnp.float32)
        return jnp.einsum("nd,ed->ne", x_nd.astype(jnp.float32), w_ed)


class MoE(nnx.Module):
    """The sparse MoE block replacing the decoder layer's MLP (transformers' names:
    ``mlp.gate.weight`` [E, D], ``mlp.experts.{gate,up,down}_proj.weight`` stacked)."""

    def __init__(self, config, *, rngs, dtype, param_dtype):
        c = config
        self.gate = Router(c.num_experts, c.hidden_size, rngs=rngs, std=c.initializer_range,
                           param_dtype=param_dtype)
        self.experts = Experts(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_experts = c.num_experts
        self.top_k = c.experts_per_token
        self.normalize = c.norm_topk_prob
        self.dtype = dtype

    def __call__(self, x, layout: Layout = BATCH_MAJOR, valid_bt=None, experts_btk=None):
        """The block on ``x`` in ``layout``; ``valid_bt`` marks the real tokens (for the
        router statistics recorded inside ``collect_router_stats``); ``experts_btk``
        [B, T, k] are expert ids to replay (see ``route``)."""
        x_btd = x if layout is BATCH_MAJOR else x.T[:, None, :]
        b, t, d = x_btd.shape
        x_nd = x_btd.reshape(b * t, d)
        logits_ne = self.gate(x_nd)
        forced_nk = None if experts_btk is None else experts_btk.reshape(b * t, self.top_k)
        weights_nk, experts_nk = route(logits_ne, self.top_k, self.normalize, forced_nk)
        if collecting_routing():
            _ROUTING.get().blocks.append(experts_nk.astype(jnp.int32).reshape(b, t, self.top_k))
        shards = expert_shards(self.num_experts, b * t)
        if shards:
            y_nd = expert_parallel_ffn(self.experts, x_nd.astype(self.dtype), experts_nk,
                                       weights_nk, self.num_experts, shards)
        else:
            x_md, group_sizes_e, order_m = dispatch(x_nd.astype(self.dtype), experts_nk,
                                                    self.num_experts)
            y_md = expert_ffn(self.experts, x_md, group_sizes_e)
            y_nd = combine(y_md, order_m, weights_nk)
        y_btd = y_nd.reshape(b, t, d)
        if collecting() and layout is BATCH_MAJOR:
            valid_n = (jnp.ones((b, t), bool) if valid_bt is None else valid_bt).reshape(-1)
            record_router_stats(self, router_stats(logits_ne, experts_nk, valid_n))
        return y_btd if layout is BATCH_MAJOR else y_btd[:, 0, :].T


def record_router_stats(module: nnx.Module, stats: RouterStats) -> None:
    """Keep a block's ``stats`` on it (an ``nnx.Intermediate``) until its layer's caller
    pops them (``pop_router_stats``), in the same trace."""
    module.router_stats = nnx.Intermediate(stats)


def pop_router_stats(module) -> RouterStats | None:
    """The ``RouterStats`` recorded in ``module``'s graph, removed from it (summed when
    several blocks recorded); None when there are none."""
    state = nnx.pop(module, nnx.Intermediate)
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    values = [v.get_value() if isinstance(v, nnx.Variable) else v for v in variables]
    found = [
        s for s in jax.tree.leaves(values, is_leaf=lambda x: isinstance(x, RouterStats))
        if isinstance(s, RouterStats)
    ]
    return _summed(found)


def _summed(found: list) -> RouterStats | None:
    """The sum of some ``RouterStats``; None for none."""
    if not found:
        return None
    total = found[0]
    for stats in found[1:]:
        total = total + stats
    return total


def take_router_stats(model, sink: list) -> RouterStats | None:
    """Per-layer ``RouterStats`` ([L, E] ...) of the forwards of ``model`` (or of a model
    inside it, e.g. an actor-critic's policy) recorded in ``sink``, summed; None when there
    are none (a dense model)."""
    mine = {id(node) for _, node in nnx.iter_graph(model)}
    return _summed([stats for module, stats in sink if id(module) in mine])
