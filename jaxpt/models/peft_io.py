"""LoRA adapters as PEFT adapter directories (``adapter_config.json`` +
``adapter_model.safetensors``), the layout ``peft.PeftModel.from_pretrained(base, dir)``
loads and ``PeftModel.save_pretrained`` writes.

PEFT names each tensor after the transformers module it adapts, under its own wrapper:
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` is ``A.T`` [r, in] and
``...lora_B.weight`` is ``B.T`` [out, r]. A stacked adapter (the decoder's layers, see
``jaxpt.models.lora``) is one such pair per adapted layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np

from jaxpt.models.hf_io import host_array
from jaxpt.models.lora import adapted, adapter_sites, projections
from jaxpt.models.moe import ExpertLinear
from jaxpt.models.safetensors_io import write_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter directory that jaxpt cannot load; the message names the file or tensor."""


@dataclasses.dataclass
class PeftAdapter:
    """A PEFT LoRA adapter read from disk: its config and ``{path: (A [in, r], B [r, out])}``."""

    directory: str
    rank: int
    alpha: float
    dropout: float
    weights: dict[str, tuple[np.ndarray, np.ndarray]]


def target_modules(model, paths) -> list[str] | str:
    """PEFT's ``target_modules`` for the adapted ``paths``: module names when every
    projection of those names is adapted, else a regex matching exactly these paths."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    everywhere = {p for p in projections(model) if p.rsplit(".", 1)[-1] in names}
    if everywhere == set(paths):
        return names
    return "^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def write_adapter(model, out_dir: str, *, base_model: str | None, dropout: float) -> str:
    """Write ``model``'s adapters as a PEFT adapter dir. Only process 0 writes; every
    process must call this (the arrays are gathered)."""
    sites = adapter_sites(model)
    if not sites:
        raise ValueError("the model has no LoRA adapters to write")
    experts = [p for p, linear in projections(model).items()
               if p in sites and isinstance(linear, ExpertLinear)]
    if experts:
        raise AdapterError(
            f"LoRA on MoE experts ({experts[0]}, ...) has no PEFT export: PEFT adapts "
            "transformers' fused expert parameters (target_parameters, one adapter over "
            "gate_up_proj) and jaxpt's separate gate/up adapters do not map onto it. Export "
            "the merged model (lora.export=merged) or adapt attention only (lora.targets)"
        )
    gathered = {}  # each (stacked) adapter gathered once
    named = []
    for path, (lora, layer) in sites.items():
        if id(lora) not in gathered:
            gathered[id(lora)] = (host_array(lora.a[...]), host_array(lora.b[...]))
        a_ir, b_ro = gathered[id(lora)]
        if layer is not None:
            a_ir, b_ro = a_ir[layer], b_ro[layer]
        named.append((f"{_PREFIX}{path}.lora_A.weight", np.ascontiguousarray(a_ir.T)))
        named.append((f"{_PREFIX}{path}.lora_B.weight", np.ascontiguousarray(b_ro.T)))
    if jax.process_index() != 0:
        return out_dir
    first, _ = next(iter(sites.values()))
    rank = int(first.a.shape[-1])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": float(first.scale * rank),
        "lora_dropout": float(dropout),
        "target_modules": target_modules(model, list(sites)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, WEIGHTS_FILE), named)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def read_adapter(adapter_dir: str) -> PeftAdapter:
    """The LoRA adapter of a PEFT dir (written by peft or by jaxpt); an AdapterError
    naming the file, key or tensor when it is not one jaxpt can load."""
    from safetensors.numpy import load_file

    config_path = os.path.join(adapter_dir, CONFIG_FILE)
    weights_path = os.path.join(adapter_dir, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterError(f"{path} does not exist (a PEFT LoRA adapter dir holds "
                               f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{config_path}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(key):
            raise AdapterError(f"{config_path}: {key}=true is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{config_path}: bias={config['bias']!r} is not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"{config_path}: per-module rank_pattern/alpha_pattern is not supported")
    if "r" not in config or "lora_alpha" not in config:
        raise AdapterError(f"{config_path}: needs 'r' and 'lora_alpha'")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    pieces: dict[str, dict[str, np.ndarray]] = {}
    for name, array in load_file(weights_path).items():
        match = _KEY.match(name)
        if match is None:
            raise AdapterError(f"{weights_path}: tensor {name!r} is not a LoRA A/B weight")
        pieces.setdefault(match.group(1), {})[match.group(2)] = array
    weights = {}
    for path, parts in sorted(pieces.items()):
        for side in "AB":
            if side not in parts:
                raise AdapterError(
                    f"{weights_path}: tensor {_PREFIX}{path}.lora_{side}.weight is missing"
                )
        a_ri, b_or = parts["A"], parts["B"]
        if a_ri.ndim != 2 or b_or.ndim != 2 or a_ri.shape[0] != rank or b_or.shape[1] != rank:
            raise AdapterError(
                f"{weights_path}: {_PREFIX}{path}.lora_A/B have shapes {a_ri.shape} and "
                f"{b_or.shape}, not [r={rank}, in] and [out, r={rank}]"
            )
        weights[path] = (a_ri.T, b_or.T)
    if not weights:
        raise AdapterError(f"{weights_path} holds no LoRA weights")
    return PeftAdapter(adapter_dir, rank, alpha, float(config.get("lora_dropout", 0.0)), weights)


def load_adapter_weights(model, adapter: PeftAdapter) -> None:
    """Copy ``adapter``'s weights into ``model``'s adapters (already attached on the same
    paths), keeping each one's dtype and sharding."""
    adapters = adapted(model)
    where = os.path.join(adapter.directory, WEIGHTS_FILE)
    missing = sorted(set(adapters) - set(adapter.weights))
    extra = sorted(set(adapter.weights) - set(adapters))
    if missing or extra:
        name = (missing or extra)[0]
        what = "has no tensor for" if missing else "has a tensor for"
        why = "adapted projection" if missing else "projection the model does not adapt"
        raise AdapterError(f"{where} {what} {_PREFIX}{name}.lora_A.weight ({why})")
    updates = {}  # per adapter weight: (variable, host copy with the layers filled in)
    for path, (lora, layer) in adapter_sites(model).items():
        a_ir, b_ro = adapter.weights[path]
        for var, value, side in ((lora.a, a_ir, "A"), (lora.b, b_ro, "B")):
            shape = tuple(var.shape if layer is None else var.shape[1:])
            if tuple(value.shape) != shape:
                raise AdapterError(
                    f"{where}: {_PREFIX}{path}.lora_{side}.weight has shape "
                    f"{tuple(value.T.shape)}, the model needs {shape[::-1]}"
                )
            if id(var) not in updates:
                updates[id(var)] = (var, np.array(host_array(var[...])))
            host = updates[id(var)][1]
            if layer is None:
                host[...] = value.astype(host.dtype)
            else:
                host[layer] = value.astype(host.dtype)
    for var, host in updates.values():
        var[...] = jax.device_put(host, var[...].sharding)


def attach_adapter(model, adapter_dir: str, *, seed: int = 0) -> PeftAdapter:
    """Put the PEFT LoRA adapter in ``adapter_dir`` on ``model``, on top of its weights
    (not merged): adapters on the projections it names, holding its weights. An
    AdapterError names the file, tensor or projection that does not fit."""
    from jaxpt.models.lora import LoRASpec, add_adapters, projections

    adapter = read_adapter(adapter_dir)
    paths = list(adapter.weights)
    unknown = sorted(set(paths) - set(projections(model)))
    if unknown:
        raise AdapterError(f"{adapter_dir} adapts {unknown[0]}, which is not a projection "
                           "of this model")
    add_adapters(model, LoRASpec(adapter.rank, adapter.alpha), seed=seed, paths=paths)
    load_adapter_weights(model, adapter)
    return adapter
