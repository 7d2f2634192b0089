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
    # bench-tiny's scale as a Qwen3-MoE (8 experts, top 2): MoE step and grouped-matmul
    # benchmarks, expert parallelism.
    "bench-moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 8192,
        "hidden_size": 256,
        "intermediate_size": 1024,  # unused: every layer is sparse
        "moe_intermediate_size": 256,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "router_aux_loss_coef": 0.001,
    },
    # SmolLM2-135M's shape (Llama, tied embeddings), random init: memory and throughput
    # benchmarks of a real small model without a download.
    "bench-small": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
}

# Public architectures (their HF config.json values; random init, no weights): shapes for
# `jaxpt.plan` memory plans and for benchmarks at real scale.
_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "use_sliding_window": False,
}
PRESETS.update({
    "qwen2.5-0.5b": {**_QWEN2, "vocab_size": 151936, "hidden_size": 896,
                     "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2,
                     "tie_word_embeddings": True},
    "qwen2.5-1.5b": {**_QWEN2, "vocab_size": 151936, "hidden_size": 1536,
                     "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2,
                     "tie_word_embeddings": True},
    "qwen2.5-7b": {**_QWEN2, "vocab_size": 152064, "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4,
                   "tie_word_embeddings": False},
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False,
    },
    # Gemma 3: local (sliding 5 of every 6 layers, rope base 10k) and global layers.
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912,
        "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
        "sliding_window_pattern": 6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rms_norm_eps": 1e-06, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 32768, "tie_word_embeddings": True,
    },
    # The text tower of google/gemma-3-27b-it (a Gemma3ForConditionalGeneration checkpoint).
    "gemma-3-27b": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": 262208, "hidden_size": 5376, "intermediate_size": 21504,
        "num_hidden_layers": 62, "num_attention_heads": 32, "num_key_value_heads": 16,
        "head_dim": 128, "query_pre_attn_scalar": 168, "sliding_window": 1024,
        "sliding_window_pattern": 6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "rms_norm_eps": 1e-06, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072, "tie_word_embeddings": True,
    },
    # Mixture of experts: 128 experts, 8 per token (3.3B of 30.5B parameters active).
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06, "hidden_act": "silu", "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
    },
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-05, "hidden_act": "silu",
        "max_position_embeddings": 32768, "sliding_window": None,
        "tie_word_embeddings": False,
    },
})


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
