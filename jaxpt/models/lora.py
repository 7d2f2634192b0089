"""Low-rank adapters (LoRA) on the decoder's projection layers.

An adapted ``Linear`` computes ``x @ W.T + scale * dropout(x) @ A @ B`` with ``A`` [in, r]
(Kaiming-uniform, as PEFT initializes it) and ``B`` [r, out] (zeros, so a fresh adapter
leaves the model unchanged) and ``scale = alpha / r``. The adapter weights are
``LoRAParam``s, a Param type of their own: ``nnx.split(model, LoRAParam, ...)`` separates
the trainable adapters from the frozen base, and dropping the adapters
(``without_adapters``) gives back the base model with no second copy of its weights.

The decoder's layers are stored stacked (``jaxpt.models.decoder``), and so are their
adapters: the LoRA of a stacked projection holds every layer's ``A`` [L, in, r] and
``B`` [L, r, out]. Paths still name one layer's projection
(``model.layers.3.self_attn.q_proj``), as transformers and PEFT do; a layer that ``spec``
does not select keeps ``A = B = 0`` (no update, and no gradient, so it stays 0).

MoE experts (``jaxpt.models.moe.ExpertLinear``, weight [L, E, out, in]) are projections
too, one site per layer (``model.layers.3.mlp.experts.gate_proj``): their adapter holds a
low-rank pair per expert, ``A`` [L, E, in, r] and ``B`` [L, E, r, out], applied to the
rows each expert receives with the same grouped matmul as the experts.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.models.decoder import LAYER_AXIS, layer_path, stacked_layers
from jaxpt.models.layers import BATCH_MAJOR, Layout, Linear
from jaxpt.models.moe import EXPERT_AXIS, ExpertLinear, grouped_matmul
from jaxpt.sharding import named_sharding

# Every attention and MLP projection of the decoder.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAParam(nnx.Param):
    """An adapter weight: under LoRA the only trained parameters."""


class DropoutKey(nnx.Variable):
    """Raw key data of an adapter's dropout, set only inside a train step."""


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which projections get adapters and how: ``targets`` is a regex searched in each
    projection's path (``model.layers.3.self_attn.q_proj``) or a sequence of module names
    (``q_proj``), matched against the path's last part as PEFT's ``target_modules`` is."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str | tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, path: str) -> bool:
        if isinstance(self.targets, str):
            return re.search(self.targets, path) is not None
        return path.rsplit(".", 1)[-1] in self.targets


class LoRA(nnx.Module):
    """The low-rank update ``scale * dropout(x) @ A @ B`` of one projection (of each layer
    of a stacked one: ``A`` [L, in, r], ``B`` [L, r, out], adapting ``layers``)."""

    def __init__(self, a_ir, b_ro, *, scale: float, dropout: float, axes, layers=None,
                 experts: bool = False):
        out_axis, in_axis = axes
        lead = (LAYER_AXIS,) if layers is not None else ()
        lead = (*lead, EXPERT_AXIS) if experts else lead
        self.a = LoRAParam(a_ir, logical_axes=(*lead, in_axis, None))
        self.b = LoRAParam(b_ro, logical_axes=(*lead, None, out_axis))
        self.scale = scale
        self.dropout = dropout
        self.layers = layers  # the adapted layers of a stacked projection (None: unstacked)
        self.dropout_key = nnx.data(None)  # a DropoutKey in train steps (``enable_dropout``)

    def _dropped(self, x, dtype):
        x = x.astype(dtype)
        if self.dropout and self.dropout_key is not None:
            keep = 1.0 - self.dropout
            key = jax.random.wrap_key_data(self.dropout_key[...])
            x = jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep, jnp.zeros_like(x))
        return x

    def grouped(self, x_mi, group_sizes_e, dtype):
        """An experts' adapter's update for rows grouped by expert (``A`` [E, in, r],
        ``B`` [E, r, out])."""
        x_mi = self._dropped(x_mi, dtype)
        a_eir, b_ero = self.a[...].astype(dtype), self.b[...].astype(dtype)
        h_mr = grouped_matmul(x_mi, a_eir, group_sizes_e, in_last=False)
        y_mo = grouped_matmul(h_mr, b_ero, group_sizes_e, in_last=False)
        return y_mo * jnp.asarray(self.scale, dtype)

    def __call__(self, x, dtype, layout: Layout = BATCH_MAJOR):
        """The update for ``x`` in ``layout`` ([..., in] batch-major, [in, ...]
        feature-major), in that layout."""
        x = self._dropped(x, dtype)
        a_ir, b_ro = self.a[...].astype(dtype), self.b[...].astype(dtype)
        if layout is BATCH_MAJOR:
            y = jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, a_ir), b_ro)
        else:  # both products with the activations as the right operand, as Linear's
            y = jnp.einsum("ro,r...->o...", b_ro, jnp.einsum("ir,i...->r...", a_ir, x))
        return y * jnp.asarray(self.scale, dtype)


def _sites(model) -> dict[str, tuple[Linear, int | None]]:
    """Every projection of ``model`` by its dotted path with its layer in the stack: a
    stacked ``Linear`` appears once per layer (``model.layers.{i}.mlp.up_proj``, layer by
    layer, in transformers' order), any other with layer None."""
    linears = [
        (path, node) for path, node in nnx.iter_graph(model)
        if isinstance(node, (Linear, ExpertLinear))
    ]
    stacked = [(p, lin, stacked_layers(lin.weight)) for p, lin in linears]
    stacked = [(p, lin, n) for p, lin, n in stacked if n is not None]
    sites, stack_listed = {}, False
    for path, linear in linears:
        if stacked_layers(linear.weight) is None:
            sites[_dotted(path)] = (linear, None)
        elif not stack_listed:
            stack_listed = True
            for i in range(max(n for _, _, n in stacked)):
                for p, lin, n in stacked:
                    if i < n:
                        sites[_dotted(layer_path(p, i))] = (lin, i)
    return sites


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def projections(model) -> dict[str, Linear | ExpertLinear]:
    """Every projection of ``model`` by its dotted path (``model.layers.0.mlp.up_proj``);
    the layers of a stacked ``Linear`` share it."""
    return {path: linear for path, (linear, _) in _sites(model).items()}


def adapter_sites(model) -> dict[str, tuple[LoRA, int | None]]:
    """Each adapted projection's path: its adapter and its layer in a stacked one."""
    out = {}
    for path, (linear, layer) in _sites(model).items():
        lora = linear.lora
        if lora is not None and (layer is None or layer in lora.layers):
            out[path] = (lora, layer)
    return out


def adapted(model) -> dict[str, LoRA]:
    """The adapters of ``model`` by the path of the projection they adapt (the layers of a
    stacked projection share its stacked adapter)."""
    return {path: lora for path, (lora, _) in adapter_sites(model).items()}


def _unique(modules):
    return list({id(m): m for m in modules}.values())


def has_adapters(model) -> bool:
    return bool(adapted(model))


def trainable_filter(model):
    """What a train step differentiates: the adapters under LoRA, else every Param."""
    return LoRAParam if has_adapters(model) else nnx.Param


def select(model, spec: LoRASpec) -> list[str]:
    """Paths of the projections ``spec`` adapts; a ValueError when it matches none."""
    paths = [p for p in projections(model) if spec.matches(p)]
    if not paths:
        examples = ", ".join(list(projections(model))[:4])
        raise ValueError(
            f"targets {spec.targets!r} match no projection; paths look like {examples}"
        )
    return paths


def add_adapters(model, spec: LoRASpec, *, seed: int, mesh=None, rules=None, paths=None):
    """Attach fresh adapters (A Kaiming-uniform, B zero) to the projections ``spec``
    selects (or to ``paths``), sharded on ``mesh`` by their logical axes. Returns the
    adapted paths."""
    sites = _sites(model)
    paths = select(model, spec) if paths is None else list(paths)
    key = jax.random.key(seed)
    chosen: dict[int, tuple[Linear, dict]] = {}
    for i, path in enumerate(paths):
        linear, layer = sites[path]
        out_f, in_f = linear.weight.shape[-2:]
        experts = _experts_of(linear)
        # PEFT's kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / np.sqrt(in_f)
        a_ir = jax.random.uniform(
            jax.random.fold_in(key, i), (*experts, in_f, spec.rank), jnp.float32, -bound, bound
        ).astype(linear.weight[...].dtype)
        chosen.setdefault(id(linear), (linear, {}))[1][layer] = a_ir
    for linear, a_by_layer in chosen.values():
        out_f, in_f = linear.weight.shape[-2:]
        experts = _experts_of(linear)
        dtype = linear.weight[...].dtype
        axes = linear.weight.get_metadata().get("logical_axes") or (None,) * linear.weight.ndim
        axes = axes[-2:]  # (out, in); the leading layers / expert axes are added back below
        num_layers = stacked_layers(linear.weight)
        expert_axis = (EXPERT_AXIS,) if experts else ()
        if num_layers is None:
            a_ir, b_ro = a_by_layer[None], jnp.zeros((*experts, spec.rank, out_f), dtype)
            lead, layers = expert_axis, None
        else:
            zero_a = jnp.zeros((*experts, in_f, spec.rank), dtype)
            a_ir = jnp.stack([a_by_layer.get(i, zero_a) for i in range(num_layers)])
            b_ro = jnp.zeros((num_layers, *experts, spec.rank, out_f), dtype)
            lead, layers = (LAYER_AXIS, *expert_axis), tuple(sorted(a_by_layer))
        if mesh is not None:
            a_spec, b_spec = (*lead, axes[1], None), (*lead, None, axes[0])
            a_ir = jax.device_put(a_ir, named_sharding(mesh, a_spec, a_ir.shape, rules))
            b_ro = jax.device_put(b_ro, named_sharding(mesh, b_spec, b_ro.shape, rules))
        adapter = LoRA(
            a_ir, b_ro, scale=spec.scale, dropout=spec.dropout, axes=axes, layers=layers,
            experts=bool(experts),
        )
        linear.lora = nnx.data(adapter)
    return paths


def _experts_of(linear) -> tuple[int, ...]:
    """(E,) for an MoE experts' projection, () for a plain one."""
    return (int(linear.weight.shape[-3]),) if isinstance(linear, ExpertLinear) else ()


def enable_dropout(model, key) -> None:
    """Give every adapter with dropout its own key for this (traced) train step; without a
    key (evaluation, sampling, export) adapters run without dropout."""
    for i, lora in enumerate(_unique(adapted(model).values())):
        if lora.dropout:
            key_i = jax.random.fold_in(key, i)
            if lora.layers is None:
                data = jax.random.key_data(key_i)
            else:  # one key per layer of a stacked adapter
                layers = jnp.arange(lora.a.shape[0])
                data = jax.vmap(lambda j, k=key_i: jax.random.key_data(jax.random.fold_in(k, j)))(
                    layers
                )
            lora.dropout_key = DropoutKey(data)


def without_adapters(model):
    """``model``'s base: a new module sharing its graph and frozen weights, every adapter
    removed (exactly the base model's forward; nothing is copied)."""
    graphdef, state = nnx.split(model)
    base = nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))
    for linear in _unique(projections(base).values()):
        linear.lora = None
    return base


def merge_adapters(model):
    """A copy of ``model`` with each adapter folded into its weight
    (``W + scale * (A @ B).T``, in float32) and removed: what a merged export writes."""
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    for linear in _unique(projections(merged).values()):
        lora = linear.lora
        if lora is None:
            continue
        w = linear.weight[...]
        a, b = lora.a[...].astype(jnp.float32), lora.b[...].astype(jnp.float32)
        delta_oi = jnp.einsum("...ir,...ro->...oi", a, b)
        linear.weight[...] = (w.astype(jnp.float32) + lora.scale * delta_oi).astype(w.dtype)
        linear.lora = None
    return merged
