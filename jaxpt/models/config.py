"""The decoder's architecture, read from (and written back as) a Hugging Face config."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import transformers

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
)
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture is not one jaxpt implements."""


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

    @property
    def rope(self) -> dict:
        return dict(self.rope_scaling)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2], float32, as transformers computes them."""
        params = self.rope
        rope_type = params.get("rope_type", params.get("type", "default"))
        dim = self.head_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv_freq = (1.0 / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
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


def _architecture_of(hf_config) -> str:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs:
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in _ARCH_BY_MODEL_TYPE:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported; jaxpt supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return _ARCH_BY_MODEL_TYPE[model_type]
    arch = archs[0]
    # Sequence-classification checkpoints (reward models) share the decoder.
    base = arch.replace("ForSequenceClassification", "ForCausalLM")
    if base not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported; jaxpt supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return base


def _rope_parameters(hf_config) -> tuple[float, tuple]:
    if hasattr(hf_config, "standardize_rope_params"):
        hf_config.standardize_rope_params()
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers 4.x configs
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    if "full_attention" in params and isinstance(params["full_attention"], dict):
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


def config_from_hf(hf_config) -> ModelConfig:
    """Read a ``transformers`` config (object or dict) into a ``ModelConfig``."""
    if isinstance(hf_config, dict):
        hf_config = hf_config_from_dict(hf_config)
    arch = _architecture_of(hf_config)
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    num_layers = hf_config.num_hidden_layers
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    is_qwen2 = arch == "Qwen2ForCausalLM"
    theta, rope_scaling = _rope_parameters(hf_config)
    config = ModelConfig(
        architecture=arch,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=True if is_qwen2 else attention_bias,
        o_bias=False if is_qwen2 else attention_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        rope_theta=theta,
        rope_scaling=rope_scaling,
        sliding_windows=_sliding_windows(hf_config, num_layers),
        initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
        max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 4096)),
    )
    if getattr(hf_config, "hidden_act", "silu") not in ("silu", "swish"):
        raise UnsupportedArchitectureError(f"hidden_act {hf_config.hidden_act!r} is not supported")
    if config.num_heads % config.num_kv_heads:
        raise ValueError(
            f"num_attention_heads ({num_heads}) must be a multiple of "
            f"num_key_value_heads ({config.num_kv_heads})"
        )
    config.inv_freq()  # fail early on an unsupported rope type
    return config


def hf_config_from_dict(config_dict: dict) -> transformers.PretrainedConfig:
    """A ``transformers`` config object from a config.json-style dict."""
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    arch = (config_dict.get("architectures") or [None])[0]
    if model_type is None:
        inverse = {v: k for k, v in _ARCH_BY_MODEL_TYPE.items()}
        model_type = inverse.get(arch)
    if model_type not in _ARCH_BY_MODEL_TYPE:
        what = f"model_type {model_type!r}" if model_type else f"architecture {arch!r}"
        raise UnsupportedArchitectureError(
            f"{what} is not supported; jaxpt supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hf_config = transformers.AutoConfig.for_model(model_type, **config_dict)
    if not getattr(hf_config, "architectures", None):
        hf_config.architectures = [_ARCH_BY_MODEL_TYPE[model_type]]
    return hf_config
