"""Named model configs that need no download: the shipped tiny model and benchmark shapes."""

from __future__ import annotations

import json
import os
from importlib import resources

PRESETS: dict[str, dict] = {
    # The benchmark model: Llama architecture, untied embeddings, float32.
    "bench-tiny": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 8192,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
}


def shipped_model_dir(name: str = "jaxpt-tiny") -> str:
    """Directory of a config shipped inside the package (``jaxpt/assets/models/NAME``)."""
    return str(resources.files("jaxpt") / "assets" / "models" / name)


def preset_config(name: str) -> dict | None:
    """The HF config dict of a named preset or shipped model, else None."""
    if name in PRESETS:
        return dict(PRESETS[name])
    path = os.path.join(shipped_model_dir(name), "config.json")
    if "/" not in name and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def load_model(name_or_path: str, *, seed: int = 0, **kwargs):
    """A preset name (random init, seeded) or an HF checkpoint dir / hub name."""
    from jaxpt.models.hf_io import from_pretrained, init_model

    config = preset_config(name_or_path)
    if config is not None and not os.path.isdir(name_or_path):
        return init_model(config, seed=seed, **kwargs)
    return from_pretrained(name_or_path, **kwargs)
