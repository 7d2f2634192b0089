"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints, without torch.

gguf-py parses the file and dequantizes its blocks with numpy (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q4_K, Q6_K, ...). We give the tensors transformers' names, undo the row order
llama.cpp writes Llama's Q/K projections in (and the 1 it adds to Gemma's norm weights),
and rebuild the config and the tokenizer as
transformers does for a GGUF file, so a model loads as
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` loads it. transformers' own
loader needs torch; this one only reads metadata up front and dequantizes a tensor when it
is asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Iterator

import gguf
import numpy as np

from jaxpt.models.config import UnsupportedArchitectureError, config_from_hf, hf_config_from_dict

log = logging.getLogger(__name__)

# GGUF general.architecture -> transformers model_type (Mistral and Mixtral files say "llama").
_MODEL_TYPES = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
    "gemma2": "gemma2", "gemma3": "gemma3_text",
}
SUPPORTED_GGUF_ARCHITECTURES = (
    "llama (and Mistral, Mixtral)", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3",
)
_GEMMA = ("gemma2", "gemma3")

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the MoE router
}
# Gemma's four norms a layer: llama.cpp's ffn_norm is the pre-feedforward one there.
_GEMMA_LAYER_TENSORS = {
    **_LAYER_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# MoE experts, stacked [E, out, in] in one tensor per layer; read one expert at a time as
# transformers' model.layers.{i}.mlp.experts.{e}.{proj}.weight.
_EXPERT_TENSORS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_EXPERT_NAME = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight")

# llama.cpp stores Llama 3's rope scaling only as per-frequency factors (`rope_freqs`);
# every Llama 3.x release used these parameters around its own factor.
_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def hf_tensor_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """transformers' name of a GGUF tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``) in a file of ``architecture``; None for
    tensors it has no place for."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    layer_tensors = _GEMMA_LAYER_TENSORS if architecture in _GEMMA else _LAYER_TENSORS
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match[2] in layer_tensors:
        return f"model.layers.{match[1]}.{layer_tensors[match[2]]}.{match[3]}"
    return None


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: it interleaves the two rotary halves of each head
    (``convert_hf_to_gguf.py``'s ``permute``), so its RoPE can rotate adjacent pairs."""
    half = weight.shape[0] // num_heads // 2
    per_head = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def _field_value(field):
    """A metadata value as Python: str, int, float, bool, or a list of them."""
    item_type = field.types[-1]
    parts = [field.parts[i] for i in field.data]
    if item_type == gguf.GGUFValueType.STRING:
        values = [bytes(p).decode("utf-8") for p in parts]
    else:
        values = [p.tolist()[0] for p in parts]
    return values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]


class GGUFCheckpoint:
    """One GGUF file: its transformers config (``hf_config``), its tensors under HF names
    (``array(name)`` dequantizes one to float32), and its tokenizer (``tokenizer()``)."""

    def __init__(self, path: str):
        self.path = str(path)
        reader = gguf.GGUFReader(self.path)
        self.metadata = {key: _field_value(field) for key, field in reader.fields.items()}
        self.architecture = self.metadata.get("general.architecture")
        self.model_type = self._model_type()
        self._tensors, self.unmapped = {}, []
        self._experts = {}  # (layer, projection) -> the stacked expert tensor
        self._last_experts = (None, None)  # (key, dequantized) of _stacked_experts
        for tensor in reader.tensors:
            name = hf_tensor_name(tensor.name, self.architecture)
            match = _LAYER_NAME.fullmatch(tensor.name)
            if match and match[2] in _EXPERT_TENSORS:
                self._experts[(int(match[1]), _EXPERT_TENSORS[match[2]])] = tensor
                num_experts = int(tensor.shape[-1])  # ggml order: [in, out, experts]
                for e in range(num_experts):
                    layer, proj = match[1], _EXPERT_TENSORS[match[2]]
                    self._tensors[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = tensor
            elif name is None:
                self.unmapped.append(tensor.name)
            else:
                self._tensors[name] = tensor
        self._rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
        ignored = [n for n in self.unmapped if n != "rope_freqs.weight"]
        if ignored:
            log.warning(
                "%s: ignoring %d tensors jaxpt has no place for, e.g. %s",
                self.path,
                len(ignored),
                ignored[:3],
            )
        self.hf_config = hf_config_from_dict(self._config_dict())
        if self._rope_freqs is not None:
            self._check_llama3_rope()

    def _model_type(self) -> str:
        arch = self.architecture
        if arch not in _MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"{self.path}: GGUF architecture {arch!r} is not supported; jaxpt reads "
                f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
            )
        if arch == "llama" and self._key("expert_count"):
            return "mixtral"  # llama.cpp writes Mixtral as "llama" with experts
        # llama.cpp writes Mistral as "llama"; as in transformers the name tells them apart
        # (transformers wants it to be exactly "mistral", llama.cpp names files "Mistral 7B
        # ..."). Full attention either way: llama.cpp runs "llama" files without a window.
        if arch == "llama" and "mistral" in str(self.metadata.get("general.name", "")).lower():
            return "mistral"
        return _MODEL_TYPES[arch]

    # ------------------------------------------------------------------------- config

    def _key(self, name: str, default=None):
        return self.metadata.get(f"{self.architecture}.{name}", default)

    def _config_dict(self) -> dict:
        key, meta = self._key, self.metadata
        num_heads = key("attention.head_count")
        hidden = key("embedding_length")
        llama_like = self.architecture == "llama"
        head_dim = (
            key("attention.key_length")
            or (key("rope.dimension_count") if llama_like else None)
            or hidden // num_heads
        )
        config = {
            "model_type": self.model_type,
            "vocab_size": key("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
            "hidden_size": hidden,
            "intermediate_size": key("feed_forward_length"),
            "num_hidden_layers": key("block_count"),
            "num_attention_heads": num_heads,
            "num_key_value_heads": key("attention.head_count_kv") or num_heads,
            "head_dim": head_dim,
            "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
            "max_position_embeddings": key("context_length"),
            "rope_theta": key("rope.freq_base", 10000.0),
            # llama.cpp writes the output projection only when it is not the embedding.
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        }
        if llama_like:
            config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
            config["mlp_bias"] = "model.layers.0.mlp.up_proj.bias" in self._tensors
        if self.model_type in ("mistral", "mixtral"):
            config["sliding_window"] = None  # llama.cpp runs "llama" files with full attention
        if self.architecture in _GEMMA:
            config.update(self._gemma_config(head_dim))
        if self.model_type == "mixtral":
            config["num_local_experts"] = key("expert_count")
            config["num_experts_per_tok"] = key("expert_used_count")
        if self.model_type == "qwen3_moe":
            config["num_experts"] = key("expert_count")
            config["num_experts_per_tok"] = key("expert_used_count")
            config["moe_intermediate_size"] = key("expert_feed_forward_length")
            config["norm_topk_prob"] = True  # llama.cpp's qwen3moe always renormalizes
        rope_scaling = self._rope_scaling()
        if rope_scaling:
            config["rope_scaling"] = rope_scaling
        for name in ("bos", "eos", "pad"):
            token_id = meta.get(f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id")
            if token_id is not None:
                config[f"{name}_token_id"] = token_id
        return config

    def _gemma_config(self, head_dim: int) -> dict:
        """Gemma's keys as llama.cpp reads them (its defaults where a file has none)."""
        key, gemma2 = self._key, self.architecture == "gemma2"
        layers, hidden = key("block_count"), key("embedding_length")
        # llama.cpp scales queries by 1/sqrt(hidden / heads) in the 27B models (46 layers
        # in Gemma 2, 62 in Gemma 3), by 1/sqrt(head_dim) in the others.
        is_27b = layers == (46 if gemma2 else 62)
        # Sliding-window layers: all but every n-th (Gemma 2: every other one), or a
        # per-layer list where the file has one.
        pattern = key("attention.sliding_window_pattern")
        if isinstance(pattern, list):
            sliding = [bool(p) for p in pattern]
        else:
            every = pattern or (2 if gemma2 else 6)
            sliding = [i % every < every - 1 for i in range(layers)]
        config = {
            "query_pre_attn_scalar": hidden // key("attention.head_count") if is_27b else head_dim,
            "sliding_window": key("attention.sliding_window"),
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "final_logit_softcapping": key("final_logit_softcapping", 30.0 if gemma2 else None),
        }
        if gemma2:
            config["attn_logit_softcapping"] = key("attn_logit_softcapping", 50.0)
        else:  # the local layers' rope base: llama.cpp's 10000 unless the file says
            config["rope_local_base_freq"] = key("rope.freq_base_swa", 10000.0)
        return config

    def _rope_scaling(self) -> dict | None:
        kind = self._key("rope.scaling.type")
        if kind not in (None, "none", "linear"):
            raise UnsupportedArchitectureError(
                f"{self.path}: rope scaling {kind!r} is not supported (linear, Llama 3 factors)"
            )
        if kind == "linear":
            return {"rope_type": "linear", "factor": self._key("rope.scaling.factor")}
        if self._rope_freqs is not None:
            return {
                "rope_type": "llama3",
                "factor": float(np.max(self._rope_freqs.data)),
                **_LLAMA3_ROPE,
            }
        return None

    def _check_llama3_rope(self) -> None:
        """The llama3 parameters we assumed must give the frequencies the file stores."""
        config = config_from_hf(self.hf_config)
        factors = np.asarray(self._rope_freqs.data, np.float32).reshape(-1)
        expected = dataclasses.replace(config, rope_scaling=()).inv_freq() / factors
        if not np.allclose(config.inv_freq(), expected, rtol=1e-4):
            raise UnsupportedArchitectureError(
                f"{self.path}: its rope_freqs factors are not Llama 3's rope scaling"
            )

    # ------------------------------------------------------------------------ tensors

    def tensors(self) -> dict[str, GGUFCheckpoint]:
        """HF tensor name -> this file, the mapping ``hf_io.load_state`` reads from."""
        return dict.fromkeys(self._tensors, self)

    def array(self, name: str) -> np.ndarray:
        """The tensor ``name`` (an HF name) dequantized to float32, in HF orientation."""
        expert = _EXPERT_NAME.fullmatch(name)
        if expert is not None:
            return self._stacked_experts(int(expert[1]), expert[3])[int(expert[2])]
        tensor = self._tensors[name]
        # The reader's data is [rows, bytes per row]; dequantize gives [out, in] as in HF.
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weight = weight.astype(np.float32, copy=False)
        if self.architecture in _GEMMA and name.endswith("norm.weight"):
            weight = weight - 1.0  # llama.cpp stores Gemma's norm weights as 1 + w
        if self.architecture == "llama":
            config = self.hf_config
            if ".self_attn.q_proj." in name:
                weight = unpermute_rows(weight, config.num_attention_heads)
            elif ".self_attn.k_proj." in name:
                weight = unpermute_rows(weight, config.num_key_value_heads)
        return weight

    def _stacked_experts(self, layer: int, proj: str) -> np.ndarray:
        """One layer's experts of one projection [E, out, in], dequantized once for all
        its experts (the last one read is kept)."""
        key = (layer, proj)
        if self._last_experts[0] != key:
            tensor = self._experts[key]
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            self._last_experts = (key, weight.astype(np.float32, copy=False))
        return self._last_experts[1]

    def named_arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, float32 array) of every tensor, one at a time, in file order."""
        for name in self._tensors:
            yield name, self.array(name)

    # ---------------------------------------------------------------------- tokenizer

    def tokenizer(self):
        """The file's tokenizer as transformers builds it for ``gguf_file=``: the same
        vocabulary, merges, special tokens, bos/eos/pad and chat template."""
        import transformers

        try:
            from transformers.integrations.gguf import (
                GGUF_TOKENIZER_MAPPING,
                convert_gguf_tokenizer,
            )
        except ImportError:  # transformers 4.x keeps them here
            from transformers.integrations.ggml import (
                GGUF_TOKENIZER_MAPPING,
                convert_gguf_tokenizer,
            )

        meta = self.metadata
        groups = {
            group: {
                name: meta[f"tokenizer.{key}"]
                for key, name in renames.items()
                if f"tokenizer.{key}" in meta
            }
            for group, renames in GGUF_TOKENIZER_MAPPING.items()
        }
        tokenizer_dict, init_kwargs = groups["tokenizer"], groups["tokenizer_config"]
        if tokenizer_dict.get("tokenizer_type") == "llama":
            # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
            init_kwargs.setdefault("add_bos_token", True)
        tokens = tokenizer_dict["tokens"]
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        ):
            token_id = meta.get(f"tokenizer.ggml.{key}")
            init_kwargs[name] = tokens[token_id] if token_id is not None else None
        backend, extra_kwargs = convert_gguf_tokenizer(self.architecture, tokenizer_dict)
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, **init_kwargs, **extra_kwargs
        )


def read_gguf(path: str) -> GGUFCheckpoint:
    """Parse a GGUF file's metadata and tensor table (its tensors are read on demand).

    The last files read are kept: a run reads one file for its model and its tokenizer,
    and parsing a large vocabulary takes seconds. Treat the result as read-only.
    """
    stat = os.stat(path)
    return _read_cached(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read_cached(path: str, mtime_ns: int, size: int) -> GGUFCheckpoint:
    return GGUFCheckpoint(path)
