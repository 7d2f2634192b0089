"""Low-rank adapters (LoRA) on the decoder's projection layers.

An adapted ``Linear`` computes ``x @ W.T + scale * dropout(x) @ A @ B`` with ``A`` [in, r]
(Kaiming-uniform, as PEFT initializes it) and ``B`` [r, out] (zeros, so a fresh adapter
leaves the model unchanged) and ``scale = alpha / r``. The adapter weights are
``LoRAParam``s, a Param type of their own: ``nnx.split(model, LoRAParam, ...)`` separates
the trainable adapters from the frozen base, and dropping the adapters
(``without_adapters``) gives back the base model with no second copy of its weights.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.models.layers import Linear
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
    """The low-rank update ``scale * dropout(x) @ A @ B`` of one projection."""

    def __init__(self, a_ir, b_ro, *, scale: float, dropout: float, axes):
        out_axis, in_axis = axes
        self.a = LoRAParam(a_ir, logical_axes=(in_axis, None))
        self.b = LoRAParam(b_ro, logical_axes=(None, out_axis))
        self.scale = scale
        self.dropout = dropout
        self.dropout_key = nnx.data(None)  # a DropoutKey in train steps (``enable_dropout``)

    def __call__(self, x, dtype):
        x = x.astype(dtype)
        if self.dropout and self.dropout_key is not None:
            keep = 1.0 - self.dropout
            key = jax.random.wrap_key_data(self.dropout_key[...])
            x = jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep, jnp.zeros_like(x))
        h = jnp.einsum("...i,ir->...r", x, self.a[...].astype(dtype))
        return jnp.einsum("...r,ro->...o", h, self.b[...].astype(dtype)) * jnp.asarray(
            self.scale, dtype
        )


def projections(model) -> dict[str, Linear]:
    """Every ``Linear`` of ``model`` by its dotted path (``model.layers.0.mlp.up_proj``)."""
    return {
        ".".join(str(p) for p in path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, Linear)
    }


def adapted(model) -> dict[str, LoRA]:
    """The adapters of ``model`` by the path of the projection they adapt."""
    return {path: lin.lora for path, lin in projections(model).items() if lin.lora is not None}


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
    adapted paths. Deep models scan their layers only while every layer is alike."""
    linears = projections(model)
    paths = select(model, spec) if paths is None else list(paths)
    key = jax.random.key(seed)
    for i, path in enumerate(paths):
        linear = linears[path]
        out_f, in_f = linear.weight.shape
        dtype = linear.weight[...].dtype
        # PEFT's kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / np.sqrt(in_f)
        a_ir = jax.random.uniform(
            jax.random.fold_in(key, i), (in_f, spec.rank), jnp.float32, -bound, bound
        ).astype(dtype)
        b_ro = jnp.zeros((spec.rank, out_f), dtype)
        axes = linear.weight.get_metadata().get("logical_axes") or (None, None)
        if mesh is not None:
            a_ir = jax.device_put(a_ir, named_sharding(mesh, (axes[1], None), a_ir.shape, rules))
            b_ro = jax.device_put(b_ro, named_sharding(mesh, (None, axes[0]), b_ro.shape, rules))
        adapter = LoRA(a_ir, b_ro, scale=spec.scale, dropout=spec.dropout, axes=axes)
        linear.lora = nnx.data(adapter)
    _stop_scanning_unlike_layers(model)
    return paths


def _stop_scanning_unlike_layers(model) -> None:
    """A layer scan runs one body for every layer: adapters on only some layers rule it out."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model, "scan_layers"):
        return
    shapes = {
        str(jax.tree.map(lambda x: x.shape, nnx.state(layer, LoRAParam))) for layer in layers
    }
    if len(shapes) > 1:
        model.scan_layers = False


def enable_dropout(model, key) -> None:
    """Give every adapter with dropout its own key for this (traced) train step; without a
    key (evaluation, sampling, export) adapters run without dropout."""
    for i, lora in enumerate(adapted(model).values()):
        if lora.dropout:
            lora.dropout_key = DropoutKey(jax.random.key_data(jax.random.fold_in(key, i)))


def without_adapters(model):
    """``model``'s base: a new module sharing its graph and frozen weights, every adapter
    removed (exactly the base model's forward; nothing is copied)."""
    graphdef, state = nnx.split(model)
    base = nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))
    for linear in projections(base).values():
        linear.lora = None
    return base


def merge_adapters(model):
    """A copy of ``model`` with each adapter folded into its weight
    (``W + scale * (A @ B).T``, in float32) and removed: what a merged export writes."""
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    for linear in projections(merged).values():
        lora = linear.lora
        if lora is None:
            continue
        w = linear.weight[...]
        delta_oi = (lora.a[...].astype(jnp.float32) @ lora.b[...].astype(jnp.float32)).T
        linear.weight[...] = (w.astype(jnp.float32) + lora.scale * delta_oi).astype(w.dtype)
        linear.lora = None
    return merged
