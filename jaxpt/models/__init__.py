"""jaxpt's causal LMs and their checkpoint I/O (Hugging Face safetensors, GGUF).

The architectures it reads are registered model families (``register_family``; see
``jaxpt.models.families`` for what a family and a model class provide).
"""

from jaxpt.models.checkpoint_path import gguf_of_spec, resolve_checkpoint_path
from jaxpt.models.config import (
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    UnsupportedArchitectureError,
    config_from_hf,
    hf_config_from_dict,
    known_activations,
)
from jaxpt.models.decoder import REMAT_POLICIES, CausalLM, KVCache
from jaxpt.models.families import (
    ModelFamily,
    family_of,
    get_family,
    register_family,
    supported_architectures,
)
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
    "ModelFamily",
    "UnsupportedArchitectureError",
    "config_from_hf",
    "family_of",
    "from_pretrained",
    "get_family",
    "gguf_of_spec",
    "hf_config_from_dict",
    "hf_config_of",
    "init_model",
    "known_activations",
    "load_model",
    "preset_config",
    "register_family",
    "resolve_checkpoint_path",
    "save_pretrained",
    "shipped_model_dir",
    "state_shardings",
    "supported_architectures",
]
