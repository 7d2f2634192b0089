"""jaxpt's causal-LM family and its checkpoint I/O (Hugging Face safetensors, GGUF)."""

from jaxpt.models.checkpoint_path import gguf_of_spec, resolve_checkpoint_path
from jaxpt.models.config import (
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    UnsupportedArchitectureError,
    config_from_hf,
    hf_config_from_dict,
)
from jaxpt.models.decoder import REMAT_POLICIES, CausalLM, KVCache
from jaxpt.models.hf_io import (
    from_pretrained,
    hf_config_of,
    init_model,
    save_pretrained,
    state_shardings,
)
from jaxpt.models.presets import PRESETS, load_model, preset_config, shipped_model_dir

__all__ = [
    "PRESETS",
    "REMAT_POLICIES",
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "UnsupportedArchitectureError",
    "config_from_hf",
    "from_pretrained",
    "gguf_of_spec",
    "hf_config_from_dict",
    "hf_config_of",
    "init_model",
    "load_model",
    "preset_config",
    "resolve_checkpoint_path",
    "save_pretrained",
    "shipped_model_dir",
    "state_shardings",
]
