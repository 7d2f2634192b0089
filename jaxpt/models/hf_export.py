"""Writing a checkpoint jaxpt reads as a Hugging Face dir, without building the model.

A GGUF file becomes ``config.json`` plus safetensors, its tensors dequantized and written
one at a time; ``generation_config.json`` carries the ids generation stops and pads on.
"""

from __future__ import annotations

import os
import shutil

import ml_dtypes
import numpy as np
import transformers

from jaxpt.models.families import family_of
from jaxpt.models.gguf_io import GGUFCheckpoint
from jaxpt.models.hf_io import write_checkpoint

GENERATION_CONFIG = "generation_config.json"


def numpy_dtype(name: str) -> np.dtype:
    """``float32``, ``float16`` or ``bfloat16`` as a numpy dtype."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def write_gguf_as_hf(
    checkpoint: GGUFCheckpoint, out_dir: str, dtype: str = "float32"
) -> transformers.PretrainedConfig:
    """Write the GGUF's tensors (as ``dtype``) and config to ``out_dir``; the config."""
    os.makedirs(out_dir, exist_ok=True)
    out_dtype = numpy_dtype(dtype)
    family = family_of(checkpoint.hf_config)  # e.g. Mixtral's block_sparse_moe names
    named = checkpoint.named_arrays()
    write_checkpoint(out_dir, ((family.checkpoint_name(n), a.astype(out_dtype)) for n, a in named))
    hf_config = checkpoint.hf_config.__class__.from_dict(checkpoint.hf_config.to_dict())
    hf_config.dtype = dtype
    hf_config.save_pretrained(out_dir)
    return hf_config


def write_generation_config(out_dir: str, hf_config, tokenizer, src_dir: str | None = None):
    """``src_dir``'s ``generation_config.json`` when it has one, else one with the bos, eos
    and pad ids of the tokenizer written beside it (``hf_config``'s where it has none): the
    tokenizer's eos is what ends a chat turn."""
    existing = os.path.join(src_dir, GENERATION_CONFIG) if src_dir else None
    if existing and os.path.isfile(existing):
        shutil.copyfile(existing, os.path.join(out_dir, GENERATION_CONFIG))
        return
    ids = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        ids[name] = value if value is not None else getattr(hf_config, name, None)
    transformers.GenerationConfig(**ids).save_pretrained(out_dir)
