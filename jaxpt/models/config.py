"""The decoder's architecture, read from (and written back as) a Hugging Face config.

Which architectures exist, and what each one's config.json leaves unsaid, is the model
family registry's business (``jaxpt.models.families``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import transformers

from jaxpt.models.families import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitectureError,
    family_of,
    family_of_model_type,
    get_family,
)

# What the MLP computes without ``jaxpt.models.layers.ACTIVATIONS``; "swish" is silu.
_BASE_ACTIVATIONS = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about its architecture."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_scaling: tuple = ()  # sorted (key, value) pairs of the HF rope parameters
    sliding_windows: tuple = ()  # per layer: window size or None
    initializer_range: float = 0.02
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"  # the MLP's gate activation (a key of layers.ACTIVATIONS)
    # Gemma
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w), in float32 when nonzero
    embed_scale: float | None = None  # token embeddings times this (Gemma: sqrt(hidden))
    query_pre_attn_scalar: float | None = None  # scores times this**-0.5 (None: head_dim)
    attn_logit_softcap: float | None = None  # scores -> tanh(scores / cap) * cap
    final_logit_softcap: float | None = None  # LM-head logits -> tanh(logits / cap) * cap
    sandwich_norms: bool = False  # norms on the attention and MLP outputs, one before the MLP
    # The rope of sliding-window layers where it differs: (theta, sorted rope parameters).
    sliding_rope: tuple | None = None
    # Mixture of experts (jaxpt.models.moe): every layer's MLP is a sparse MoE block.
    num_experts: int = 0  # 0: a dense MLP in every layer
    experts_per_token: int = 0  # top-k experts each token is routed to
    moe_intermediate_size: int = 0  # each expert's MLP width
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1
    router_aux_loss_coef: float = 0.0  # the checkpoint's load-balancing loss weight

    @property
    def rope(self) -> dict:
        return dict(self.rope_scaling)

    def uses_sliding_rope(self, window: int | None) -> bool:
        """Whether a layer with this sliding ``window`` rotates by ``sliding_rope``."""
        return self.sliding_rope is not None and window is not None

    def inv_freq(self, sliding: bool = False) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2], float32, as transformers computes them;
        ``sliding``: those of the sliding-window layers (``sliding_rope``)."""
        theta, params = self.rope_theta, self.rope
        if sliding and self.sliding_rope is not None:
            theta, params = self.sliding_rope[0], dict(self.sliding_rope[1])
        rope_type = params.get("rope_type", params.get("type", "default"))
        dim = self.head_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
        if rope_type == "default":
            return inv_freq
        if rope_type == "linear":
            return (inv_freq / np.float32(params["factor"])).astype(np.float32)
        if rope_type == "llama3":
            factor = params["factor"]
            low, high = params["low_freq_factor"], params["high_freq_factor"]
            old_len = params["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = (2 * math.pi / inv_freq).astype(np.float32)
            scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        raise UnsupportedArchitectureError(
            f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3)"
        )


def _rope_parameters(hf_config, layer_type: str = "full_attention") -> tuple[float, tuple]:
    """(theta, sorted rope parameters) of the layers of ``layer_type``: transformers 5
    keeps them per layer type where they differ (Gemma 3: {"full_attention": {...},
    "sliding_attention": {...}})."""
    if hasattr(hf_config, "standardize_rope_params"):
        hf_config.standardize_rope_params()
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers 4.x configs
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    elif isinstance(params.get("full_attention"), dict):
        params = dict(params["full_attention"])
    theta = float(params.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    if params.get("rope_type", params.get("type", "default")) == "default":
        params = {}
    return theta, tuple(sorted((k, v) for k, v in params.items() if v is not None))


def _sliding_windows(hf_config, num_layers: int) -> tuple:
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if window is None:
        return (None,) * num_layers
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (window,) * num_layers


def known_activations() -> tuple[str, ...]:
    """The ``hidden_act`` values the MLP implements (``jaxpt.models.layers.ACTIVATIONS``)."""
    try:
        from jaxpt.models.layers import ACTIVATIONS
    except ImportError:  # a jaxpt whose MLP is silu only
        return _BASE_ACTIVATIONS
    return tuple(ACTIVATIONS)


def _activation(name: str) -> str:
    known = known_activations()
    if name == "swish" and name not in known and "silu" in known:
        return "silu"  # transformers' alias
    if name not in known:
        raise UnsupportedArchitectureError(
            f"hidden_act {name!r} is not supported (supported: {', '.join(known)}; add one "
            "with jaxpt.models.layers.register_activation)"
        )
    return name


def config_from_hf(hf_config) -> ModelConfig:
    """Read a ``transformers`` config (object or dict) into a ``ModelConfig``, the family's
    flags applied (see ``jaxpt.models.families``)."""
    if isinstance(hf_config, dict):
        hf_config = hf_config_from_dict(hf_config)
    family = family_of(hf_config)
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    num_layers = hf_config.num_hidden_layers
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    theta, rope_scaling = _rope_parameters(hf_config)
    sliding_rope = _rope_parameters(hf_config, "sliding_attention")
    config = ModelConfig(
        architecture=family.architecture,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=attention_bias if family.qkv_bias is None else family.qkv_bias,
        o_bias=attention_bias if family.o_bias is None else family.o_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        qk_norm=family.qk_norm,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        sliding_windows=_sliding_windows(hf_config, num_layers),
        initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
        max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 4096)),
        hidden_act=family.hidden_act or getattr(hf_config, "hidden_act", None) or "silu",
        sliding_rope=None if sliding_rope == (theta, rope_scaling) else sliding_rope,
    )
    if family.read_config is not None:
        config = dataclasses.replace(config, **family.read_config(hf_config))
    config = dataclasses.replace(config, hidden_act=_activation(config.hidden_act))
    if config.num_heads % config.num_kv_heads:
        raise ValueError(
            f"num_attention_heads ({num_heads}) must be a multiple of "
            f"num_key_value_heads ({config.num_kv_heads})"
        )
    for sliding in (False, True):  # fail early on an unsupported rope type
        config.inv_freq(sliding)
    return config


def hf_config_from_dict(config_dict: dict) -> transformers.PretrainedConfig:
    """A ``transformers`` config object from a config.json-style dict: the family's config
    class where it names one, else transformers' class for the ``model_type``."""
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    arch = (config_dict.get("architectures") or [None])[0]
    family = family_of_model_type(model_type) if model_type or arch is None else get_family(arch)
    if family.config_cls is not None:
        hf_config = family.config_cls(**config_dict)
    else:
        hf_config = transformers.AutoConfig.for_model(family.model_type, **config_dict)
    if not getattr(hf_config, "architectures", None):
        hf_config.architectures = [family.architecture]
    return hf_config


__all__ = [  # the registry's names stay importable from here too
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "UnsupportedArchitectureError",
    "config_from_hf",
    "hf_config_from_dict",
    "known_activations",
]
