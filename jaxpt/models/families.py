"""Model families: the architectures jaxpt reads, trains and writes, looked up by name.

A ``ModelFamily`` says how a Hugging Face checkpoint of one architecture maps onto jaxpt's
decoder: its ``architectures`` / ``model_type`` names, the transformers config class
(for a ``model_type`` transformers does not know), the flags a config.json does not
state (Qwen2's q/k/v biases, Qwen3's q/k norms, a fixed activation), and the tensor
names where they differ from Llama's. Llama, Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3
(text) are registered below through the same ``register_family`` a user's module calls::

    # mypkg/arch.py, imported by a run through the config key ``imports: [mypkg.arch]``
    from jaxpt.models import ModelFamily, register_family

    register_family(ModelFamily(architecture="MyForCausalLM", model_type="my",
                                config_cls=MyConfig, qk_norm=True))

Reading a config (``config_from_hf``) fills ``ModelConfig`` from the config.json keys
every Llama-like family shares (sizes, ``rms_norm_eps``, ``attention_bias``,
``mlp_bias``, ``hidden_act``, rope parameters, sliding windows), then the family's flags,
then whatever its ``read_config`` returns. A ``...ForSequenceClassification`` checkpoint
(a reward model) or ``...ForTokenClassification`` one (a process reward model) belongs to
the family of its ``...ForCausalLM``.

WHAT A MODEL CLASS PROVIDES. ``ModelFamily.model_cls`` (default ``jaxpt.models.CausalLM``)
is built as ``model_cls(config, rngs=..., dtype=..., param_dtype=..., remat=...,
attention_impl=..., scan_layers=...)`` with ``config`` a ``ModelConfig``. The loop, the
losses and the sampler then rely on this, which ``CausalLM`` implements (subclass it to
change a layer, and keep the rest):

- ``model(input_ids_bt, positions_bt, segment_ids_bt, attention_mask=None, *, cache=None,
  return_hidden=False)``: float32 logits [B, T, V], or final hidden states [B, T, D] with
  ``return_hidden``; with a ``KVCache`` it returns ``(out, new_cache)``. ``segment_ids``
  separate packed documents (0 = padding); no token attends across segments.
- ``model.logits(hidden_btd)``: the LM head alone (chunked losses call it per chunk).
- ``model.config`` (the ``ModelConfig``: ``KVCache.init`` reads ``num_layers``,
  ``num_kv_heads``, ``head_dim``) and ``model.dtype`` (the compute dtype).
- Every weight an ``nnx.Param`` with ``logical_axes`` metadata (sharding); its state path
  joined with dots is its checkpoint name (after ``weight_renames``), and a leading
  ``layers`` axis marks a weight stacked over layers (``decoder.stacked_layers``).
- For the sampler's one-token decode step (``jaxpt.models.decode``): the same call with
  ``layout=jaxpt.models.layers.FEATURE_MAJOR`` and a cache, returning logits [V, B] (on
  CPU; elsewhere the batch-major call is used).

Reward models and PPO's critic (``jaxpt.models.classifier``, ``actor_critic``) subclass
``CausalLM`` itself: a family's config flags and weight names apply to them, its
``model_cls`` does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import transformers


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture is not one jaxpt implements."""


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """How one Hugging Face architecture maps onto jaxpt (see the module docstring)."""

    architecture: str  # config.json ``architectures`` entry, e.g. "LlamaForCausalLM"
    model_type: str  # config.json ``model_type``, e.g. "llama"
    # The transformers config class; needed when transformers does not know model_type
    # (registering the family then registers it with ``transformers.AutoConfig``).
    config_cls: type | None = None
    qkv_bias: bool | None = None  # None: config.json's ``attention_bias``
    o_bias: bool | None = None  # None: config.json's ``attention_bias``
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3)
    hidden_act: str | None = None  # None: config.json's ``hidden_act`` (default silu)
    # (jaxpt name fragment, checkpoint name fragment) pairs: replaced in order when
    # writing a checkpoint, in reverse when reading one, e.g. (("mlp.", "ffn."),).
    weight_renames: tuple[tuple[str, str], ...] = ()
    model_cls: type | None = None  # None: jaxpt.models.CausalLM
    # More ModelConfig fields read from the transformers config (they override the rest).
    read_config: Callable[[Any], dict] | None = None
    description: str = ""

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint's tensor name of a jaxpt (Llama-style) name."""
        for ours, theirs in self.weight_renames:
            name = name.replace(ours, theirs)
        return name

    def jaxpt_name(self, name: str) -> str:
        """The jaxpt (Llama-style) name of a checkpoint's tensor name."""
        for ours, theirs in reversed(self.weight_renames):
            name = name.replace(theirs, ours)
        return name


_FAMILIES: dict[str, ModelFamily] = {}  # by architecture


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Add a model family; returns it. Registering the same family again is a no-op;
    another family with a taken architecture or model_type is a ``ValueError`` unless
    ``replace=True``."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_family expects a ModelFamily, got {family!r}")
    if not family.architecture.endswith("ForCausalLM"):
        raise ValueError(
            f"architecture {family.architecture!r} must end in 'ForCausalLM' (its "
            "'...ForSequenceClassification' checkpoints then share the family)"
        )
    taken = [
        f for f in _FAMILIES.values()
        if f != family and (f.architecture == family.architecture or f.model_type == family.model_type)
    ]
    if taken and not replace:
        raise ValueError(
            f"model family {family.architecture!r} (model_type {family.model_type!r}) "
            f"clashes with the registered {taken[0].architecture!r} (model_type "
            f"{taken[0].model_type!r}); pass replace=True to replace it"
        )
    if family.config_cls is not None:
        _register_config_class(family)
    for old in taken:
        del _FAMILIES[old.architecture]
    _FAMILIES[family.architecture] = family
    return family


def _register_config_class(family: ModelFamily) -> None:
    declared = getattr(family.config_cls, "model_type", None)
    if declared != family.model_type:
        raise ValueError(
            f"{family.config_cls.__name__}.model_type is {declared!r}, expected "
            f"{family.model_type!r}"
        )
    # So AutoConfig.from_pretrained reads its checkpoints (every loader in jaxpt does).
    if family.model_type not in transformers.CONFIG_MAPPING:
        transformers.AutoConfig.register(family.model_type, family.config_cls)


def supported_architectures() -> tuple[str, ...]:
    """The registered architectures, in registration order."""
    return tuple(_FAMILIES)


def get_family(architecture: str) -> ModelFamily:
    """The family of an architecture name (``...ForCausalLM`` or
    ``...ForSequenceClassification`` / ``...ForTokenClassification``)."""
    base = architecture
    for head in ("ForSequenceClassification", "ForTokenClassification"):
        base = base.replace(head, "ForCausalLM")
    if base not in _FAMILIES:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; jaxpt supports "
            f"{', '.join(_FAMILIES)} (a family of your own: jaxpt.models.register_family)"
        )
    return _FAMILIES[base]


def family_of_model_type(model_type: str | None) -> ModelFamily:
    """The family of a config.json ``model_type``."""
    for family in _FAMILIES.values():
        if family.model_type == model_type:
            return family
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; jaxpt supports "
        f"{', '.join(_FAMILIES)} (a family of your own: jaxpt.models.register_family)"
    )


def family_of(hf_config) -> ModelFamily:
    """The family of a transformers config (object or config.json dict): by its first
    ``architectures`` entry, else by its ``model_type``."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda k: getattr(hf_config, k, None)
    architectures = list(get("architectures") or [])
    if architectures:
        return get_family(architectures[0])
    return family_of_model_type(get("model_type"))


class _ArchitecturesView(Sequence):
    """The registered architectures, read live (``SUPPORTED_ARCHITECTURES``)."""

    def __getitem__(self, index):
        return supported_architectures()[index]

    def __len__(self) -> int:
        return len(_FAMILIES)

    def __iter__(self) -> Iterator[str]:
        return iter(supported_architectures())

    def __contains__(self, name) -> bool:
        return name in _FAMILIES

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, Sequence) else NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return repr(supported_architectures())


SUPPORTED_ARCHITECTURES: Sequence[str] = _ArchitecturesView()

LLAMA = register_family(ModelFamily("LlamaForCausalLM", "llama", description="Llama 2/3"))
QWEN2 = register_family(
    ModelFamily(
        "Qwen2ForCausalLM", "qwen2", qkv_bias=True, o_bias=False,
        description="Qwen2 / Qwen2.5: biases on q, k, v only",
    )
)
QWEN3 = register_family(
    ModelFamily("Qwen3ForCausalLM", "qwen3", qk_norm=True, description="Qwen3: q/k RMSNorm")
)
MISTRAL = register_family(ModelFamily("MistralForCausalLM", "mistral", description="Mistral"))


def _gemma_config(hf_config) -> dict:
    """What Gemma 2 and 3 compute beyond Llama (transformers' Gemma2/Gemma3 modeling)."""
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise UnsupportedArchitectureError("Gemma with use_bidirectional_attention is not supported")
    final_cap = getattr(hf_config, "final_logit_softcapping", None)
    return {
        "hidden_act": getattr(hf_config, "hidden_activation", None) or "gelu_pytorch_tanh",
        "norm_offset": 1.0,
        "embed_scale": hf_config.hidden_size**0.5,
        "query_pre_attn_scalar": float(hf_config.query_pre_attn_scalar),
        "final_logit_softcap": None if final_cap is None else float(final_cap),
        "sandwich_norms": True,
    }


def _gemma2_config(hf_config) -> dict:
    attn_cap = getattr(hf_config, "attn_logit_softcapping", None)
    return {**_gemma_config(hf_config),
            "attn_logit_softcap": None if attn_cap is None else float(attn_cap)}


GEMMA2 = register_family(
    ModelFamily(
        "Gemma2ForCausalLM", "gemma2", read_config=_gemma2_config,
        description="Gemma 2: Gemma norms, GeGLU, attention and final logit soft-capping",
    )
)
# Gemma 3 keeps attn_logit_softcapping in its config but transformers never applies it.
GEMMA3 = register_family(
    ModelFamily(
        "Gemma3ForCausalLM", "gemma3_text", qk_norm=True, read_config=_gemma_config,
        description="Gemma 3 (text): Gemma 2's layer with q/k norms, local and global rope",
    )
)


def _qwen3_moe_config(hf_config) -> dict:
    """Qwen3-MoE's expert settings; every layer must be sparse (the decoder's layers are
    stacked, so they share one structure)."""
    num_experts = int(getattr(hf_config, "num_experts", 0) or 0)
    if not num_experts:
        return {}
    num_layers = hf_config.num_hidden_layers
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    mlp_only = set(getattr(hf_config, "mlp_only_layers", None) or ())
    dense = [i for i in range(num_layers) if i in mlp_only or (i + 1) % step]
    if dense:
        raise UnsupportedArchitectureError(
            f"Qwen3-MoE config with dense MLP layers {dense} (decoder_sparse_step={step}, "
            f"mlp_only_layers={sorted(mlp_only)}): jaxpt stacks its layers, so every layer "
            "must be sparse (decoder_sparse_step=1, mlp_only_layers=[])"
        )
    return {
        "num_experts": num_experts,
        "experts_per_token": int(hf_config.num_experts_per_tok),
        "moe_intermediate_size": int(hf_config.moe_intermediate_size),
        "norm_topk_prob": bool(getattr(hf_config, "norm_topk_prob", True)),
        "router_aux_loss_coef": float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
    }


def _mixtral_config(hf_config) -> dict:
    """Mixtral's expert settings: its ``intermediate_size`` is each expert's width, and the
    top-k weights are always renormalized (``router_jitter_noise`` is not applied)."""
    return {
        "num_experts": int(hf_config.num_local_experts),
        "experts_per_token": int(hf_config.num_experts_per_tok),
        "moe_intermediate_size": int(hf_config.intermediate_size),
        "norm_topk_prob": True,
        "router_aux_loss_coef": float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
    }


QWEN3_MOE = register_family(
    ModelFamily(
        "Qwen3MoeForCausalLM", "qwen3_moe", qk_norm=True, read_config=_qwen3_moe_config,
        description="Qwen3-MoE: q/k RMSNorm, sparse experts in every layer",
    )
)
MIXTRAL = register_family(
    ModelFamily(
        "MixtralForCausalLM", "mixtral", read_config=_mixtral_config,
        # Checkpoints name the block ``block_sparse_moe`` and the experts' projections
        # w1 (gate), w3 (up), w2 (down).
        weight_renames=(
            (".mlp.", ".block_sparse_moe."),
            (".gate_proj.", ".w1."),
            (".up_proj.", ".w3."),
            (".down_proj.", ".w2."),
        ),
        description="Mixtral: sparse experts in every layer",
    )
)
