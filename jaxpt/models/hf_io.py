"""Hugging Face checkpoints <-> sharded NNX models.

Loading builds the model abstractly, then materializes each parameter directly on its
mesh sharding from a memory-mapped safetensors file: every device reads only its own
slice, so no host ever holds a full copy per device. Saving gathers one tensor at a time.
The decoder's stacked layer weights ([L, ...], see ``decoder.stacked_layers``) convert at
this boundary: transformers' ``model.layers.{i}.*`` tensors load into index ``i`` and
are written back one layer at a time, so the files are transformers' own. MoE expert
weights, stacked once more on an ``expert`` axis ([L, E, ...]), convert the same way to
transformers' per-expert tensors (``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``,
what its ``save_pretrained`` writes); transformers-5-style fused ones
(``mlp.experts.gate_up_proj`` [E, 2F, D], ``mlp.experts.down_proj``) load too. A model family
whose tensor names differ from Llama's (``ModelFamily.weight_renames``) is renamed at this
boundary too: inside jaxpt every model's tensors carry Llama's names.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from jax.experimental import multihost_utils

from jaxpt.models.checkpoint_path import find_gguf, resolve_checkpoint_path
from jaxpt.models.config import ModelConfig, config_from_hf, hf_config_from_dict
from jaxpt.models.decoder import CausalLM, layer_path, stacked_layers
from jaxpt.models.families import ModelFamily, UnsupportedArchitectureError, family_of, get_family
from jaxpt.models.moe import EXPERT_AXIS
from jaxpt.models.safetensors_io import SafetensorsFile, write_safetensors
from jaxpt.sharding import make_mesh, named_sharding

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _dtype(name_or_dtype):
    return jnp.dtype(name_or_dtype) if name_or_dtype is not None else jnp.dtype(jnp.float32)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_name(path) -> str:
    """HF tensor name of an NNX state path, e.g. ``model.layers.0.mlp.up_proj.weight``."""
    return ".".join(str(p) for p in path)


def split_dims(var) -> tuple[int, ...]:
    """The leading dims of a Variable that checkpoints hold as separate tensors: () for
    a plain one, (layers,) for a stacked one, (layers, experts) for stacked MoE experts."""
    if stacked_layers(var) is None:
        return ()
    axes = var.get_metadata().get("logical_axes")
    return tuple(var.shape[:2]) if len(axes) > 1 and axes[1] == EXPERT_AXIS else var.shape[:1]


def expert_path(path, expert: int) -> tuple:
    """transformers' path of one expert's slice: ``(..., experts, gate_proj, weight)`` ->
    ``(..., experts, 3, gate_proj, weight)``."""
    path = tuple(path)
    at = path.index("experts") + 1
    return (*path[:at], expert, *path[at:])


def hf_names(path, var) -> list[str]:
    """The HF tensor names a state Variable holds: one per layer for a stacked one, one
    per layer and expert (layer-major) for stacked experts."""
    dims = split_dims(var)
    if not dims:
        return [param_name(path)]
    if len(dims) == 1:
        return [param_name(layer_path(path, i)) for i in range(dims[0])]
    return [
        param_name(expert_path(layer_path(path, i), e))
        for i in range(dims[0]) for e in range(dims[1])
    ]


def state_shardings(state: nnx.State, mesh, rules=None):
    """A tree of NamedShardings matching ``state`` (each Variable by its logical axes)."""

    def sharding_of(var):
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        return named_sharding(mesh, axes, var.shape, rules)

    return jax.tree.map(sharding_of, state, is_leaf=_is_variable)


def _build(config, seed, **model_kwargs) -> CausalLM:
    model_cls = get_family(config.architecture).model_cls or CausalLM
    return model_cls(config, rngs=nnx.Rngs(seed), **model_kwargs)


def _model_kwargs(dtype, param_dtype, remat, attention_impl, scan_layers=None):
    return {
        "dtype": _dtype(dtype),
        "param_dtype": _dtype(param_dtype),
        "remat": remat,
        "attention_impl": attention_impl,
        "scan_layers": scan_layers,
    }


def init_model(
    config: ModelConfig | dict | transformers.PretrainedConfig,
    *,
    seed: int = 0,
    mesh=None,
    rules=None,
    dtype="float32",
    param_dtype="float32",
    remat: str = "none",
    attention_impl: str | None = None,
    scan_layers: bool | None = None,
) -> CausalLM:
    """A randomly initialized model (seeded), created directly on its mesh shardings."""
    hf_config = config if not isinstance(config, dict) else hf_config_from_dict(config)
    model_config = hf_config if isinstance(hf_config, ModelConfig) else config_from_hf(hf_config)
    mesh = mesh if mesh is not None else make_mesh({}, devices=jax.devices()[:1])
    kwargs = _model_kwargs(dtype, param_dtype, remat, attention_impl, scan_layers)
    abstract = nnx.eval_shape(lambda: _build(model_config, 0, **kwargs))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)
    state = jax.jit(
        lambda: nnx.state(_build(model_config, seed, **kwargs)), out_shardings=shardings
    )()
    model = nnx.merge(graphdef, state)
    _attach_hf_config(model, hf_config)
    return model


def _attach_hf_config(model, hf_config):
    # The HF config travels with the model (not as state) so save_pretrained can write it.
    if isinstance(hf_config, ModelConfig):
        hf_config = None
    object.__setattr__(model, "_hf_config", hf_config)


def hf_config_of(model) -> transformers.PretrainedConfig:
    hf_config = getattr(model, "_hf_config", None)
    if hf_config is None:
        raise ValueError(
            "this model was built from a bare ModelConfig; pass an HF config to save it"
        )
    return hf_config


def resolve_model_dir(name_or_path: str) -> str:
    """A local directory for a checkpoint: the path itself, or a Hub snapshot download."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise ValueError(f"{name_or_path} is a file; from_pretrained expects a model directory")
    from huggingface_hub import snapshot_download

    return snapshot_download(
        name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt"]
    )


class _RenamedTensor:
    """One checkpoint tensor read under its jaxpt name (``ModelFamily.weight_renames``)."""

    def __init__(self, file: SafetensorsFile, checkpoint_name: str):
        self.file, self.checkpoint_name = file, checkpoint_name

    def array(self, name: str) -> np.ndarray:
        return self.file.array(self.checkpoint_name)


class _ExpertSlice:
    """One expert's weight read out of a fused [E, ...] tensor (rows ``rows`` of it)."""

    def __init__(self, source, fused_name: str, expert: int, rows: slice):
        self.source, self.fused_name, self.expert, self.rows = source, fused_name, expert, rows

    def array(self, name: str) -> np.ndarray:
        return self.source.array(self.fused_name)[self.expert, self.rows]


def with_expert_slices(tensors: dict) -> dict:
    """``tensors`` (jaxpt name -> file) with transformers-5-style fused expert tensors
    (``...mlp.experts.gate_up_proj`` [E, 2F, D], ``...mlp.experts.down_proj`` [E, D, F])
    also offered per expert under the names jaxpt reads
    (``...mlp.experts.{e}.gate_proj.weight``, ``up_proj``, ``down_proj``)."""
    out = dict(tensors)
    for name, source in tensors.items():
        prefix, _, last = name.rpartition(".experts.")
        if not prefix or last not in ("gate_up_proj", "down_proj"):
            continue
        shape = source.array(name).shape
        del out[name]  # read through its slices
        for e in range(shape[0]):
            base = f"{prefix}.experts.{e}"
            if last == "down_proj":
                out[f"{base}.down_proj.weight"] = _ExpertSlice(source, name, e, slice(None))
            else:
                half = shape[1] // 2
                out[f"{base}.gate_proj.weight"] = _ExpertSlice(source, name, e, slice(0, half))
                out[f"{base}.up_proj.weight"] = _ExpertSlice(source, name, e, slice(half, None))
    return out


def _family_of_dir(model_dir: str) -> ModelFamily | None:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        config_dict = json.load(f)
    try:
        return family_of(config_dict)
    except UnsupportedArchitectureError:  # reported where the config is read
        return None


def _tensor_files(model_dir: str, family: ModelFamily | None = None) -> dict:
    """Map each tensor's jaxpt name to the (lazily opened) file that holds it; ``family``
    (default: the one config.json names) says how the checkpoint's names differ."""
    files = _checkpoint_files(model_dir)
    family = family or _family_of_dir(model_dir)
    if family is not None and family.weight_renames:
        files = {family.jaxpt_name(n): _RenamedTensor(file, n) for n, file in files.items()}
    return with_expert_slices(files)


def _checkpoint_files(model_dir: str) -> dict[str, SafetensorsFile]:
    """Map each tensor name of the checkpoint to the (lazily opened) file that holds it."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    single_path = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = {
            fn: SafetensorsFile(os.path.join(model_dir, fn)) for fn in set(weight_map.values())
        }
        return {name: files[fn] for name, fn in weight_map.items()}
    if os.path.exists(single_path):
        file = SafetensorsFile(single_path)
        return dict.fromkeys(file.keys(), file)
    raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")


def load_state(abstract_state: nnx.State, tensors: dict, mesh, rules, model_dir: str) -> nnx.State:
    """Fill an abstract state from ``tensors`` (HF name -> a file whose ``array(name)`` is
    sliceable: safetensors or GGUF), each tensor straight onto its sharding; ``model_dir``
    names the source in errors."""
    shardings = state_shardings(abstract_state, mesh, rules)
    flat_shardings = dict(nnx.to_flat_state(shardings))
    loaded = []
    for path, var in nnx.to_flat_state(abstract_state):
        dims = split_dims(var)
        shape = tuple(var.shape[len(dims):])
        sources = []
        for name in hf_names(path, var):
            if name not in tensors:
                raise KeyError(f"{model_dir}: checkpoint is missing tensor {name!r}")
            source = tensors[name].array(name)
            if tuple(source.shape) != shape:
                raise ValueError(
                    f"{model_dir}: tensor {name!r} has shape {tuple(source.shape)}, "
                    f"expected {shape}"
                )
            sources.append(source)
        dtype = var.dtype
        grid = np.empty(len(sources), object)
        for j, source in enumerate(sources):
            grid[j] = source
        grid = grid.reshape(dims)  # the source of each (layer, expert) slice

        def read_slice(index, grid=grid, dtype=dtype):
            lead = grid.ndim
            if not lead:
                return np.asarray(grid[()][index]).astype(dtype)
            picked, rest = grid[tuple(index[:lead])], tuple(index[lead:])
            pieces = [np.asarray(s[rest]).astype(dtype) for s in picked.reshape(-1)]
            return np.stack(pieces).reshape(picked.shape + pieces[0].shape)

        array = jax.make_array_from_callback(var.shape, flat_shardings[path], read_slice)
        loaded.append((path, var.replace(array)))
    return nnx.from_flat_state(loaded)


def from_pretrained(
    name_or_path: str,
    *,
    dtype="float32",
    param_dtype="float32",
    mesh=None,
    rules=None,
    remat: str = "none",
    attention_impl: str | None = None,
    scan_layers: bool | None = None,
) -> CausalLM:
    """Load a causal-LM checkpoint: a Hugging Face dir or hub name (single or sharded
    safetensors), a GGUF file (or a dir holding one), or ``pkg:<module>/<path>``.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the weights;
    ``mesh`` (default: one device) and ``rules`` place every tensor on its sharding;
    ``scan_layers`` as in ``CausalLM`` (None: scan deep models' cache-free forwards).
    """
    path = resolve_checkpoint_path(name_or_path)
    gguf_path = find_gguf(path)
    if gguf_path is not None:
        from jaxpt.models.gguf_io import read_gguf

        checkpoint = read_gguf(gguf_path)
        source = gguf_path
        hf_config = _copy_config(checkpoint.hf_config)  # the checkpoint's is shared
    else:
        source = resolve_model_dir(path)
        hf_config = transformers.AutoConfig.from_pretrained(source)
    config = config_from_hf(hf_config)
    mesh = mesh if mesh is not None else make_mesh({}, devices=jax.devices()[:1])
    kwargs = _model_kwargs(dtype, param_dtype, remat, attention_impl, scan_layers)
    abstract = nnx.eval_shape(lambda: _build(config, 0, **kwargs))
    graphdef, abstract_state = nnx.split(abstract)
    if gguf_path is not None:
        tensors = checkpoint.tensors()
    else:
        tensors = _tensor_files(source, get_family(config.architecture))
    expected = {n for p, v in nnx.to_flat_state(abstract_state) for n in hf_names(p, v)}
    unused = sorted(set(tensors) - expected - {"lm_head.weight"})
    if unused:
        log.warning("%s: ignoring %d unused tensors, e.g. %s", source, len(unused), unused[:3])
    state = load_state(abstract_state, tensors, mesh, rules, source)
    model = nnx.merge(graphdef, state)
    _attach_hf_config(model, hf_config)
    return model


def host_array(value: jax.Array) -> np.ndarray:
    """A (possibly sharded, multi-host) array gathered whole to the host."""
    if not value.is_fully_addressable:
        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def host_arrays(state: nnx.State, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array) per tensor, gathered to the host one tensor at a time: a
    stacked layer weight as one tensor per layer, layer by layer (transformers' order)."""

    def out(array):
        return array.astype(dtype) if dtype is not None else array

    flat = list(nnx.to_flat_state(state))
    done = set()
    for path, var in flat:
        if stacked_layers(var) is None:
            yield param_name(path), out(host_array(var[...]))
        elif path not in done:  # every stacked weight, one layer at a time
            stacked = [(p, v, stacked_layers(v)) for p, v in flat if stacked_layers(v)]
            done.update(p for p, _, _ in stacked)
            for i in range(max(n for _, _, n in stacked)):
                for p, v, n in stacked:
                    if i >= n:
                        continue
                    array = out(host_array(v[...][i]))
                    if len(split_dims(v)) == 1:
                        yield param_name(layer_path(p, i)), array
                    else:  # MoE experts: one tensor per expert, as transformers saves them
                        for e in range(array.shape[0]):
                            yield param_name(expert_path(layer_path(p, i), e)), array[e]


def write_checkpoint(
    model_dir: str, named_arrays, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """Write ``(name, array)`` pairs as safetensors, sharded with an index above the limit."""
    shards, current, size = [], [], 0
    for name, array in named_arrays:
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, array))
        size += array.nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(os.path.join(model_dir, SINGLE_FILE), shards[0])
        stale = os.path.join(model_dir, INDEX_FILE)
        if os.path.exists(stale):
            os.remove(stale)
        return [SINGLE_FILE]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(model_dir, filename), shard)
        names.append(filename)
        for name, array in shard:
            weight_map[name] = filename
            total += array.nbytes
    with open(os.path.join(model_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def save_pretrained(
    model: CausalLM,
    out_dir: str,
    *,
    dtype=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    hf_config: transformers.PretrainedConfig | None = None,
) -> str:
    """Write ``config.json`` and safetensors that ``transformers`` loads.

    ``dtype`` (e.g. ``"bfloat16"``) converts the weights on the way out; the default keeps
    the parameter dtype. Only process 0 writes; every process must call this.
    """
    hf_config = hf_config or hf_config_of(model)
    family = family_of(hf_config)
    state = nnx.state(model, nnx.Param)
    out_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    arrays = ((family.checkpoint_name(n), a) for n, a in host_arrays(state, out_dtype))
    if jax.process_index() != 0:
        for _ in arrays:  # take part in the gathers
            pass
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    first_dtype = None

    def tracked():
        nonlocal first_dtype
        for name, array in arrays:
            first_dtype = first_dtype or array.dtype
            yield name, array

    write_checkpoint(out_dir, tracked(), max_shard_bytes=max_shard_bytes)
    hf_config = _copy_config(hf_config)
    hf_config.dtype = str(np.dtype(first_dtype)) if first_dtype is not None else "float32"
    hf_config.save_pretrained(out_dir)
    return out_dir


def _copy_config(hf_config):
    return hf_config.__class__.from_dict(hf_config.to_dict())
