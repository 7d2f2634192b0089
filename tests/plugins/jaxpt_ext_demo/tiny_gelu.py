"""Model family ``TinyGeluForCausalLM`` (``model_type: tiny_gelu``): a Llama-like decoder
with a tanh-GELU gated MLP and per-head q/k norms, its own transformers config class, and
checkpoint tensors named ``...ffn.*`` where Llama's say ``...mlp.*``."""

from __future__ import annotations

import transformers

from jaxpt.models import ModelFamily, register_family


class TinyGeluConfig(transformers.LlamaConfig):
    model_type = "tiny_gelu"

    def __init__(self, hidden_act: str = "gelu_pytorch_tanh", **kwargs):
        super().__init__(hidden_act=hidden_act, **kwargs)


FAMILY = register_family(
    ModelFamily(
        architecture="TinyGeluForCausalLM",
        model_type="tiny_gelu",
        config_cls=TinyGeluConfig,
        qk_norm=True,
        weight_renames=((".mlp.", ".ffn."),),
        description="Llama-like, gelu_pytorch_tanh MLP, q/k norms",
    )
)
