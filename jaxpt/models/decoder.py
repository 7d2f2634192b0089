"""The decoder-only causal LM (Llama / Qwen2 / Qwen3 / Mistral family) in Flax NNX.

Module and parameter names mirror transformers', with the layers stored stacked: one
``DecoderLayer`` whose every weight has a leading layer axis (logical axis ``layers``), so
``model.layers.self_attn.q_proj.weight`` [L, out, in] holds transformers'
``model.layers.{i}.self_attn.q_proj.weight`` at index ``i`` (``layer_path`` names them;
checkpoint I/O converts at the boundary). A cache-free forward scans over the stacked
weights as they are stored; cached forwards (prefill, decoding) slice layer ``i``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxpt.models.config import ModelConfig
from jaxpt.models.layers import (
    BATCH_MAJOR,
    FEATURE_MAJOR,
    MLP,
    Attention,
    AttentionMask,
    Layout,
    RMSNorm,
    project,
    rotary_cos_sin,
    window_masks,
)
from jaxpt.models.moe import (
    MoE,
    collecting_routing,
    pop_block_routing,
    pop_router_stats,
    record_forward_routing,
    record_forward_stats,
)
from jaxpt.models.paged import LayerPages, PagedKVCache, PagedMask
from jaxpt.sharding import constrain

# Deeper cache-free forwards scan over their layers by default (compile time, see CausalLM).
SCAN_MIN_LAYERS = 8
LAYER_AXIS = "layers"  # logical axis of the stacked layer dimension (sharding: replicated)


def stacked_layers(variable) -> int | None:
    """The number of layers a stacked Variable holds (its leading ``layers`` axis); None
    for a Variable that is not stacked."""
    axes = variable.get_metadata().get("logical_axes")
    return int(variable.shape[0]) if axes and axes[0] == LAYER_AXIS else None


def layer_path(path, layer: int) -> tuple:
    """The path of layer ``layer``'s slice of a stacked path, transformers' name for it:
    ``(model, layers, mlp, ...)`` -> ``(model, layers, 3, mlp, ...)``."""
    path = tuple(path)
    at = path.index(LAYER_AXIS) + 1
    return (*path[:at], layer, *path[at:])


def stacked_init(create, rngs: nnx.Rngs, num_layers: int) -> nnx.Module:
    """``create(rngs)``'s module with every Variable stacked ``num_layers`` deep on a new
    leading ``layers`` axis (their logical axes gain it in front): one module's init
    vmapped over per-layer keys, so one layer is traced and the random draws land
    directly in the stacked weights."""
    stacked = nnx.split_rngs(splits=num_layers)(nnx.vmap(create, in_axes=0, out_axes=0))(rngs)
    graphdef, state = nnx.split(stacked)

    def add_layer_axis(variable):
        axes = variable.get_metadata().get("logical_axes")
        if axes is None:
            return variable
        return variable.replace(variable[...], logical_axes=(LAYER_AXIS, *axes))

    state = jax.tree.map(add_layer_axis, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _unstack_floats(leaves, axes):
    return [
        [_constrain(x[i], ax[1:] if ax else None) for x, ax in zip(leaves, axes)]
        for i in range(leaves[0].shape[0])
    ]


def _unstack_fwd(leaves, axes):
    return _unstack_floats(leaves, axes), None


def _unstack_bwd(axes, _, per_layer_cts):
    # One stack of the layers' cotangents, not a sum of zero-padded slices per layer, laid
    # out as the stacked weight is (else the partitioner picks a layout to reshard from).
    return ([_constrain(jnp.stack(cts), ax) for cts, ax in zip(zip(*per_layer_cts), axes)],)


_unstack_floats.defvjp(_unstack_fwd, _unstack_bwd)


def _constrain(x, axes):
    return x if axes is None else constrain(x, axes)


def _unstack(leaves, axes, num_layers: int) -> list[list]:
    """``[[x[i] for x in leaves] for i in range(num_layers)]``, differentiable as a stack;
    ``axes`` are each leaf's logical axes (None: unknown)."""
    floats = [j for j, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.inexact)]
    float_axes = tuple(axes[j] for j in floats)
    sliced = _unstack_floats([leaves[j] for j in floats], float_axes) if floats else []
    layers = [[None] * len(leaves) for _ in range(num_layers)]
    for i in range(num_layers):
        for j, x in enumerate(leaves):  # integer leaves (dropout keys) carry no gradient
            layers[i][j] = sliced[i][floats.index(j)] if j in floats else x[i]
    return layers


# What each decoder layer keeps for the backward pass (the rest is recomputed):
#   none: everything (no recompute); full: only the layer input (recompute the whole layer);
#   dots_saveable / dots: every matmul output; dots_no_batch: weight matmuls only (not the
#   attention scores); offload: the weight matmul outputs, moved to pinned host memory
#   between the passes (on CPU, where device memory is host memory, that is dots_no_batch).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


@struct.dataclass
class KVCache:
    """Per-layer keys [B, K, H, S] and values [B, K, S, H] (the layouts decoding reads in
    place, see ``layers.decode_attention``) plus what the attention mask needs per slot."""

    k: tuple
    v: tuple
    segment_ids: jax.Array  # [B, S], 0 = empty or padding
    positions: jax.Array  # [B, S]
    index: jax.Array  # scalar int32: the next slot to write

    @classmethod
    def init(cls, config: ModelConfig, batch: int, length: int, dtype=jnp.float32):
        k_shape = (batch, config.num_kv_heads, config.head_dim, length)
        v_shape = (batch, config.num_kv_heads, length, config.head_dim)
        return cls(
            k=tuple(jnp.zeros(k_shape, dtype) for _ in range(config.num_layers)),
            v=tuple(jnp.zeros(v_shape, dtype) for _ in range(config.num_layers)),
            segment_ids=jnp.zeros((batch, length), jnp.int32),
            positions=jnp.zeros((batch, length), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


def _norm_kwargs(config, dtype, param_dtype) -> dict:
    return {"eps": config.rms_norm_eps, "dtype": dtype, "param_dtype": param_dtype,
            "offset": config.norm_offset}


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks. With ``config.sandwich_norms`` (Gemma) the
    attention output is normalized (``post_attention_layernorm``) before its residual and
    the MLP sits between ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm``;
    without, ``post_attention_layernorm`` is the MLP's input norm (Llama)."""

    def __init__(self, config, *, rngs, dtype, param_dtype, attention_impl=None):
        norm = _norm_kwargs(config, dtype, param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(
            config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, implementation=attention_impl
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, **norm)
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        mlp_cls = MoE if getattr(config, "num_experts", 0) else MLP  # sparse: jaxpt.models.moe
        self.mlp = mlp_cls(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, h, cos, sin, mask, kv_cache=None, cache_index=None,
                 layout: Layout = BATCH_MAJOR, experts_btk=None):
        """The layer on hidden states ``h`` in ``layout``: (new hidden states, new kv).
        ``experts_btk`` [B, T, k]: expert ids an MoE block replays (``moe.route``)."""
        axis = layout.feature_axis
        attn, kv_cache = self.self_attn(
            self.input_layernorm(h, axis), cos, sin, mask, kv_cache, cache_index, layout
        )
        mlp_kwargs = {}
        if isinstance(self.mlp, MoE):
            mlp_kwargs = {"valid_bt": _real_tokens(mask), "experts_btk": experts_btk}
        if self.pre_feedforward_layernorm is None:
            h = h + attn
            h = h + self.mlp(self.post_attention_layernorm(h, axis), layout, **mlp_kwargs)
        else:
            h = h + self.post_attention_layernorm(attn, axis)
            mlp = self.mlp(self.pre_feedforward_layernorm(h, axis), layout, **mlp_kwargs)
            h = h + self.post_feedforward_layernorm(mlp, axis)
        return layout.constrain(h, ("batch", "seq", "embed")), kv_cache


def _real_tokens(mask):
    """The queries' real-token mask [B, T] of a layer's attention mask (None: unknown)."""
    if isinstance(mask, AttentionMask):
        return mask.q_segment_bt != 0
    return mask.valid_bt if isinstance(mask, PagedMask) else None


class Embedding(nnx.Module):
    """Token embeddings (looked up times ``scale`` where given: Gemma's sqrt(hidden), in
    the weights' dtype as transformers multiplies) and, through ``attend``, an LM head."""

    def __init__(self, vocab_size, dim, *, rngs, std, dtype, param_dtype, scale=None):
        self.weight = nnx.Param(
            std * jax.random.normal(rngs.params(), (vocab_size, dim), param_dtype),
            logical_axes=("vocab", "embed"),
        )
        self.dtype = dtype
        self.scale = scale

    def __call__(self, ids_bt, layout: Layout = BATCH_MAJOR):
        x_btd = jnp.take(self.weight[...], ids_bt, axis=0)
        if self.scale is not None:
            x_btd = x_btd * jnp.asarray(self.scale, x_btd.dtype)
        return layout.from_batch_major(x_btd.astype(self.dtype))

    def attend(self, h, layout: Layout = BATCH_MAJOR):
        return project(h, self.weight[...].astype(self.dtype), layout)


class Decoder(nnx.Module):
    def __init__(self, config, *, rngs, dtype, param_dtype, attention_impl=None):
        c = config
        self.embed_tokens = Embedding(
            c.vocab_size,
            c.hidden_size,
            rngs=rngs,
            std=c.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            scale=c.embed_scale,
        )
        self.layers = stacked_init(
            lambda rngs: DecoderLayer(
                c, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
            ),
            rngs,
            c.num_layers,
        )
        self.num_layers = c.num_layers
        self.norm = RMSNorm(c.hidden_size, **_norm_kwargs(c, dtype, param_dtype))

    def unstacked(self) -> list[DecoderLayer]:
        """Each layer as a ``DecoderLayer`` of its own, sliced from the stacked weights (for
        forwards that run the layers one by one: through a KV cache, decoding). Their
        gradient flows back as one stack."""
        if isinstance(self.layers, nnx.List):  # already sliced (``with_layers_unstacked``)
            return list(self.layers)
        graphdef, state = nnx.split(self.layers)
        leaves, treedef = jax.tree.flatten(state)
        variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        axes = [v.get_metadata().get("logical_axes") for v in variables]
        axes = tuple(tuple(a) if a else None for a in axes)
        return [
            nnx.merge(graphdef, jax.tree.unflatten(treedef, layer))
            for layer in _unstack(leaves, axes, self.num_layers)
        ]


class CausalLM(nnx.Module):
    """Decoder-only transformer with an LM head.

    Call with ``input_ids`` [B, T] and optionally ``positions``, ``segment_ids`` (packed
    documents, 0 = padding) or an ``attention_mask`` (1 = real token). Returns float32
    logits [B, T, V]; with ``cache`` (a ``KVCache``) returns ``(logits, new_cache)``. A
    decode step (one token per row, through a cache) may run feature-major
    (``layout=FEATURE_MAJOR``, see ``layers.Layout``): logits [V, B], hidden states [D, B].

    An MoE model takes ``routing`` [L, B, T, k] int32: the expert ids each layer routes
    each token to instead of its router's top k (routing replay, ``moe.route``; -1: the
    token's own top k); inside ``moe.collect_routing()`` each forward records its own.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        attention_impl: str | None = None,
        lm_head: bool = True,
        scan_layers: bool | None = None,
    ):
        """``lm_head=False`` builds the decoder alone (heads such as a reward model's score
        are added by subclasses). ``scan_layers`` runs the layers of a cache-free forward
        (training, scoring) as one ``lax.scan`` over the stacked weights, so compile time
        does not grow with depth; None scans from ``SCAN_MIN_LAYERS`` layers on, False
        unrolls the same scan."""
        if remat not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat policy {remat!r} (config key 'model.remat'); choose from "
                f"{list(REMAT_POLICIES)}"
            )
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers
        self.model = Decoder(
            config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
        )
        if config.tie_word_embeddings or not lm_head:
            self.lm_head = None
        else:
            self.lm_head = Embedding(
                config.vocab_size,
                config.hidden_size,
                rngs=rngs,
                std=config.initializer_range,
                dtype=dtype,
                param_dtype=param_dtype,
            )

    def _scans(self) -> bool:
        num_layers = self.config.num_layers
        return bool(num_layers >= SCAN_MIN_LAYERS if self.scan_layers is None else self.scan_layers)

    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding attention window (None: full attention)."""
        windows = self.config.sliding_windows
        return [windows[i] if windows else None for i in range(self.config.num_layers)]

    def layer_kinds(self) -> list[tuple[int | None, bool]]:
        """Each layer's (sliding window, whether it rotates by ``config.sliding_rope``):
        layers of one kind share their mask and rotary tables."""
        return [(w, self.config.uses_sliding_rope(w)) for w in self.layer_windows()]

    def logits(self, h, layout: Layout = BATCH_MAJOR):
        """LM-head logits (float32) from final hidden states in ``layout``, soft-capped
        where the config says (``final_logit_softcap``: Gemma 2)."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        logits = head.attend(h, layout).astype(jnp.float32)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return layout.constrain(logits, ("batch", "seq", "vocab"))

    def __call__(
        self,
        input_ids,
        positions=None,
        segment_ids=None,
        attention_mask=None,
        *,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        layout: Layout = BATCH_MAJOR,
        routing=None,
    ):
        ids_bt = jnp.asarray(input_ids, jnp.int32)
        b, t = ids_bt.shape
        if layout is FEATURE_MAJOR and (cache is None or t != 1):
            raise ValueError("the feature-major layout runs one token per row through a cache")
        if segment_ids is None:
            segment_ids = (
                jnp.ones((b, t), jnp.int32)
                if attention_mask is None
                else jnp.asarray(attention_mask, jnp.int32)
            )
        segment_bt = jnp.asarray(segment_ids, jnp.int32)
        if positions is None and isinstance(cache, PagedKVCache):
            raise ValueError("a forward through paged KV takes the positions of its tokens")
        if positions is None:
            if attention_mask is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            else:  # count real tokens so left padding does not shift positions
                positions = jnp.maximum(jnp.cumsum(segment_bt != 0, axis=1) - 1, 0)
            if cache is not None:  # decoding continues after each row's last cached token
                cached_bs = jnp.where(cache.segment_ids != 0, cache.positions + 1, 0)
                positions = positions + jnp.max(cached_bs, axis=1, keepdims=True)
        positions_bt = jnp.asarray(positions, jnp.int32)

        paged_cache = isinstance(cache, PagedKVCache)
        windows = self.layer_windows()
        if paged_cache:  # positions are slots in each row's own pages
            masks = {w: PagedMask(positions_bt, segment_bt != 0, w) for w in dict.fromkeys(windows)}
        else:
            if cache is None:
                q_slot_t = jnp.arange(t, dtype=jnp.int32)
                k_slot_s, k_segment_bs, k_pos_bs = q_slot_t, segment_bt, positions_bt
            else:
                q_slot_t, k_slot_s, k_segment_bs, k_pos_bs = cached_keys(
                    cache, segment_bt, positions_bt
                )
            masks = window_masks(
                windows, segment_bt, q_slot_t, positions_bt, k_segment_bs, k_slot_s, k_pos_bs
            )

        kinds = self.layer_kinds()
        rotary = {
            sliding: rotary_cos_sin(positions_bt, jnp.asarray(self.config.inv_freq(sliding)))
            for sliding in dict.fromkeys(s for _, s in kinds)
        }
        # What each kind of layer reads: its rotary (cos, sin) and its mask.
        inputs = {kind: (*rotary[kind[1]], masks[kind[0]]) for kind in dict.fromkeys(kinds)}
        h = layout.constrain(self.model.embed_tokens(ids_bt, layout), ("batch", "seq", "embed"))
        policy = REMAT_POLICIES[self.remat]
        if routing is not None:
            routing = jnp.asarray(routing, jnp.int32)
        if cache is None and self._scans():
            h, (router_stats, experts_lbtk) = _scan_layers(
                self.model.layers, h, inputs, kinds, policy, routing
            )
        else:
            # Multi-token forwards through a cache (GRPO's shared-prompt training forward,
            # a sampler's prefill) remat too; single-token decode steps run inside the
            # sampler's loop, where nothing is differentiated.
            h, new_k, new_v, router_stats, experts_lbtk = self._layers_one_by_one(
                h, inputs, kinds, cache, policy if t > 1 or cache is None else None, layout,
                routing,
            )
        if router_stats is not None:  # per layer, see jaxpt.models.moe.take_router_stats
            record_forward_stats(self, router_stats)
        if experts_lbtk is not None and collecting_routing():
            record_forward_routing(experts_lbtk)
        h = self.model.norm(h, layout.feature_axis)
        out = h if return_hidden else self.logits(h, layout)
        if cache is None:
            return out
        if paged_cache:
            return out, cache.replace(pages=new_k)
        new_cache = KVCache(
            k=new_k,
            v=new_v,
            segment_ids=k_segment_bs,
            positions=k_pos_bs,
            index=cache.index + t,
        )
        return out, new_cache

    def _layers_one_by_one(self, h, inputs, kinds, cache, remat_policy, layout, routing=None):
        """The layers unrolled, each sliced from the stacked weights, through ``cache``
        when there is one: the hidden states, each layer's new keys and values, and the
        MoE layers' stacked router statistics and routed expert ids (or None).
        ``inputs`` holds (cos, sin, mask) per kind of layer, ``kinds`` each layer's;
        ``routing`` [L, B, T, k] the expert ids to replay (or None)."""

        def run_layer(layer, h, layer_inputs, kv, index, experts_btk):
            cos, sin, mask = layer_inputs
            h, kv = layer(h, cos, sin, mask, kv, index, layout, experts_btk)
            return h, kv, pop_router_stats(layer), pop_block_routing()

        if remat_policy is not None:
            run_layer = nnx.remat(run_layer, policy=remat_policy, prevent_cse=True)
        new_k, new_v, stats, routed = [], [], [], []
        for i, layer in enumerate(self.model.unstacked()):
            if isinstance(cache, PagedKVCache):
                kv, index = cache.layer(i), None
            else:
                kv = None if cache is None else (cache.k[i], cache.v[i])
                index = None if cache is None else cache.index
            h, kv, layer_stats, layer_experts = run_layer(
                layer, h, inputs[kinds[i]], kv, index, None if routing is None else routing[i]
            )
            stats.append(layer_stats)
            routed.append(layer_experts)
            if isinstance(kv, LayerPages):  # one entry per layer: its pages
                new_k.append(kv.pages)
            elif kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        stack = lambda found: (
            None if found[0] is None else jax.tree.map(lambda *s: jnp.stack(s), *found)
        )
        return h, tuple(new_k), tuple(new_v), stack(stats), stack(routed)


def with_layers_unstacked(model: CausalLM) -> CausalLM:
    """A view of ``model`` (inside a trace) whose decoder holds its layers sliced, once, as
    a list: for loops that run the layers one by one at every step (a sampler's decode
    loop), where XLA:CPU would otherwise copy every layer's weights out of the stack again
    at each step. The slices cost one copy of the layer weights while the view lives."""
    view = nnx.merge(*nnx.split(model))
    view.model.layers = nnx.List(view.model.unstacked())
    return view


def cached_keys(cache: KVCache, segment_bt, positions_bt):
    """Where ``T`` new tokens go in ``cache`` and what the mask needs of every slot: the
    query slots [T], all key slots [S], and the key segment ids and positions [B, S] with
    the new tokens written at ``cache.index``."""
    t = segment_bt.shape[1]
    q_slot_t = cache.index + jnp.arange(t, dtype=jnp.int32)
    k_segment_bs = jax.lax.dynamic_update_slice(cache.segment_ids, segment_bt, (0, cache.index))
    k_pos_bs = jax.lax.dynamic_update_slice(cache.positions, positions_bt, (0, cache.index))
    k_slot_s = jnp.arange(k_segment_bs.shape[1], dtype=jnp.int32)
    return q_slot_t, k_slot_s, k_segment_bs, k_pos_bs


def _scan_layers(layers, h_btd, inputs, kinds, remat_policy, routing=None):
    """Run the stacked decoder ``layers`` as one ``lax.scan`` over their weights as stored:
    the compiled program is the same size for 2 layers or 80, and no weight is copied.
    Returns the hidden states and the layers' stacked MoE router statistics and routed
    expert ids (each None for dense layers). ``routing`` [L, B, T, k] (or None) is scanned
    along: each layer's expert ids to replay.

    ``inputs`` holds (cos, sin, ``AttentionMask``) per distinct kind of ``kinds`` (one per
    layer: its window and rope, see ``CausalLM.layer_kinds``); where the layers differ
    (Qwen2's ``max_window_layers``, Gemma's local and global layers) each layer's kind
    index is scanned along and a ``lax.switch`` picks its inputs, each branch with a static
    window as fused kernels need.
    """
    graphdef, state = nnx.split(layers)
    distinct = list(dict.fromkeys(kinds))
    which_l = jnp.asarray([distinct.index(k) for k in kinds], jnp.int32)

    def run(layer, h, kind, experts_btk):
        h = layer(h, *inputs[kind], experts_btk=experts_btk)[0]
        # MoE router statistics and routed expert ids, None for dense layers
        return h, (pop_router_stats(layer), pop_block_routing())

    def body(h, xs):
        state, which, experts_btk = xs
        layer = nnx.merge(graphdef, state)
        branches = [lambda h, kind=kind: run(layer, h, kind, experts_btk) for kind in distinct]
        return branches[0](h) if len(branches) == 1 else jax.lax.switch(which, branches, h)

    if remat_policy is not None:
        body = jax.checkpoint(body, policy=remat_policy, prevent_cse=False)
    return jax.lax.scan(body, h_btd, (state, which_l, routing))
