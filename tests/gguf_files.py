"""Small random GGUF files, written with gguf-py as llama.cpp lays them out: a byte-level BPE
tokenizer (256 bytes, a few merges, ChatML control tokens), F32 norms and biases, and every
matrix in one ggml type.

gguf-py cannot quantize to the K-quants, so those get random blocks whose f16 scales are set
so the weights come out near zero-mean at ~1/sqrt(fan_in) scale; their dequantized values
are as well defined as any real file's.
"""

from __future__ import annotations

import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from transformers.convert_slow_tokenizer import bytes_to_unicode

QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_MERGES = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("a", "t"),
    ("e", "n"),
    ("Ġ", "w"),
    ("o", "r"),
    ("i", "s"),
    ("Ġ", "o"),
    ("e", "s"),
    ("Ġ", "c"),
    ("l", "l"),
    ("Ġw", "or"),
    ("Ġwor", "l"),
    ("i", "t"),
    ("Ġ", "h"),
    ("Ġh", "e"),
    ("Ġhe", "ll"),
    ("Ġhell", "o"),
]
# Byte offsets of the f16 scales (d, and dmin where there is one) in a K-quant block.
_K_SCALES = {Q.Q4_K: (0, 2), Q.Q6_K: (208, None)}
_DMIN_OVER_D = 7.5  # Q4_K: w = d*sc*q - dmin*m, zero-mean when dmin ~ d * mean(q)

ARCHS = {  # test name -> (general.architecture, general.name, extra settings)
    "llama": ("llama", "tiny llama", {}),
    # transformers treats only a file named exactly "mistral" as Mistral, and then fails (its
    # gguf-py has no "mistral" arch); jaxpt goes by the name containing it, as llama.cpp files
    # are named. Without a sliding window the two compute the same.
    "mistral": ("llama", "Tiny Mistral v0.3", {}),
    "qwen2": ("qwen2", "tiny qwen2", {"qkv_bias": True}),
    # transformers ignores qwen3's key_length and uses Qwen3Config's head_dim, 128.
    "qwen3": ("qwen3", "tiny qwen3", {"head_dim": 128, "qk_norm": True}),
    # Gemma: transformers reads no query_pre_attn_scalar from a GGUF (its default is 256)
    # and llama.cpp scales by head_dim, so head_dim is 256; nor does it read Gemma 2's
    # soft-capping keys (its defaults, 50 and 30, are written).
    "gemma2": ("gemma2", "tiny gemma2", {"head_dim": 256, "gemma": True, "softcaps": (50.0, 30.0)}),
    "gemma3": ("gemma3", "tiny gemma3", {"head_dim": 256, "gemma": True, "qk_norm": True}),
}


def tokenizer_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the tiny byte-level BPE."""
    tokens = list(bytes_to_unicode().values())
    tokens += ["".join(pair) for pair in _MERGES]
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    return tokens + list(SPECIAL_TOKENS), [int(t) for t in types], [" ".join(p) for p in _MERGES]


def _k_quant_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random K-quant blocks [rows, bytes], scaled so the values are ~N(0, 1/cols)."""
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block_size, block_bytes), dtype=np.uint8)
    d_at, dmin_at = _K_SCALES[qtype]

    def put_f16(at: int, value: float) -> None:
        halves = np.full(blocks.shape[:2], value, np.float16)
        blocks[..., at : at + 2] = halves[..., None].view(np.uint8)

    def set_scales(d: float) -> np.ndarray:
        put_f16(d_at, d)
        if dmin_at is not None:
            put_f16(dmin_at, d * _DMIN_OVER_D)
        return blocks.reshape(rows, -1)

    # The values are linear in the scales: measure at d=1, then scale to the target.
    std = gguf.quants.dequantize(set_scales(1.0), qtype).std()
    return set_scales(float(cols**-0.5 / std)).copy()


def _add_matrix(writer, name: str, weight: np.ndarray, qtype, rng) -> None:
    if qtype == Q.F32:
        writer.add_tensor(name, weight.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, weight.astype(np.float16))
    elif qtype in _K_SCALES:
        writer.add_tensor(name, _k_quant_blocks(qtype, *weight.shape, rng), raw_dtype=qtype)
    else:
        writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)


def _add_tokenizer(writer, tokens, types, merges) -> None:
    """The test vocabulary as llama.cpp writes a GPT-2 style BPE tokenizer."""
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))


def write_gguf(
    path: str,
    arch: str = "llama",
    quant: str = "Q8_0",
    *,
    tied: bool = True,
    seed: int = 0,
    hidden: int = 256,
    ffn: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    write_vocab_size: bool = True,
    rope_theta: float = 10000.0,
    sliding_window: int | None = None,
    edit=None,
) -> str:
    """A random GGUF of ``arch`` (a key of ARCHS) with every matrix in ``quant``;
    ``edit(writer)`` adds keys or tensors of its own. Gemma files carry llama.cpp's four
    norms a layer, each stored as 1 + w (``convert_hf_to_gguf.py`` adds the 1), and its
    sliding window (default: none)."""
    gguf_arch, name, extra = ARCHS[arch]
    head_dim = extra.get("head_dim", hidden // heads)
    qtype = Q[quant]
    rng = np.random.default_rng(seed)
    tokens, types, merges = tokenizer_vocab()
    vocab = len(tokens)

    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = gguf.GGUFWriter(path, gguf_arch)
    writer.add_name(name)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-5)
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    if "softcaps" in extra:
        writer.add_attn_logit_softcapping(extra["softcaps"][0])
        writer.add_final_logit_softcapping(extra["softcaps"][1])
    if write_vocab_size:
        writer.add_vocab_size(vocab)
    _add_tokenizer(writer, tokens, types, merges)
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template(CHAT_TEMPLATE)

    def matrix(name, rows, cols):
        weight = rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)
        _add_matrix(writer, name, weight, qtype, rng)

    def vector(name, size, base=0.0):
        writer.add_tensor(name, (base + 0.2 * rng.standard_normal(size)).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden)
    for i in range(layers):
        blk = f"blk.{i}"
        vector(f"{blk}.attn_norm.weight", hidden, 1.0)
        matrix(f"{blk}.attn_q.weight", heads * head_dim, hidden)
        matrix(f"{blk}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"{blk}.attn_v.weight", kv_heads * head_dim, hidden)
        if extra.get("qkv_bias"):
            vector(f"{blk}.attn_q.bias", heads * head_dim)
            vector(f"{blk}.attn_k.bias", kv_heads * head_dim)
            vector(f"{blk}.attn_v.bias", kv_heads * head_dim)
        if extra.get("qk_norm"):
            vector(f"{blk}.attn_q_norm.weight", head_dim, 1.0)
            vector(f"{blk}.attn_k_norm.weight", head_dim, 1.0)
        matrix(f"{blk}.attn_output.weight", hidden, heads * head_dim)
        if extra.get("gemma"):
            vector(f"{blk}.post_attention_norm.weight", hidden, 1.0)
            vector(f"{blk}.post_ffw_norm.weight", hidden, 1.0)
        vector(f"{blk}.ffn_norm.weight", hidden, 1.0)
        matrix(f"{blk}.ffn_gate.weight", ffn, hidden)
        matrix(f"{blk}.ffn_up.weight", ffn, hidden)
        matrix(f"{blk}.ffn_down.weight", hidden, ffn)
    vector("output_norm.weight", hidden, 1.0)
    if not tied:
        matrix("output.weight", vocab, hidden)
    if edit is not None:
        edit(writer)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order for "llama" files (convert_hf_to_gguf.py's ``permute``)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_moe_gguf(path: str, hf_model, name: str) -> str:
    """An F32 GGUF of a transformers Qwen3-MoE or Mixtral model's own weights, laid out as
    llama.cpp's converter writes them: Qwen3-MoE as ``qwen3moe``, Mixtral as ``llama`` with
    expert tensors (Q/K rows permuted); per layer the router ``ffn_gate_inp`` [E, D] and the
    experts stacked ``ffn_gate_exps``/``ffn_up_exps`` [E, F, D], ``ffn_down_exps``
    [E, D, F]. The model's vocabulary must be ``tokenizer_vocab()``'s."""
    config = hf_model.config
    qwen = config.model_type == "qwen3_moe"
    arch = "qwen3moe" if qwen else "llama"
    weights = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    tokens, types, merges = tokenizer_vocab()
    assert config.vocab_size == len(tokens), "build the model with the tokenizer's vocab size"
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    experts = config.num_experts if qwen else config.num_local_experts

    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_expert_count(experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if qwen:
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    _add_tokenizer(writer, tokens, types, merges)

    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        hf, blk = f"model.layers.{i}", f"blk.{i}"
        q, k = weights[f"{hf}.self_attn.q_proj.weight"], weights[f"{hf}.self_attn.k_proj.weight"]
        if not qwen:
            q, k = _llama_permute(q, heads), _llama_permute(k, kv_heads)
        writer.add_tensor(f"{blk}.attn_norm.weight", weights[f"{hf}.input_layernorm.weight"])
        writer.add_tensor(f"{blk}.attn_q.weight", q)
        writer.add_tensor(f"{blk}.attn_k.weight", k)
        writer.add_tensor(f"{blk}.attn_v.weight", weights[f"{hf}.self_attn.v_proj.weight"])
        writer.add_tensor(f"{blk}.attn_output.weight", weights[f"{hf}.self_attn.o_proj.weight"])
        if qwen:
            writer.add_tensor(f"{blk}.attn_q_norm.weight", weights[f"{hf}.self_attn.q_norm.weight"])
            writer.add_tensor(f"{blk}.attn_k_norm.weight", weights[f"{hf}.self_attn.k_norm.weight"])
        writer.add_tensor(f"{blk}.ffn_norm.weight", weights[f"{hf}.post_attention_layernorm.weight"])
        writer.add_tensor(f"{blk}.ffn_gate_inp.weight", weights[f"{hf}.mlp.gate.weight"])
        gate_up = weights[f"{hf}.mlp.experts.gate_up_proj"]  # [E, 2F, D]: gate rows, then up
        ffn = gate_up.shape[1] // 2
        writer.add_tensor(f"{blk}.ffn_gate_exps.weight", np.ascontiguousarray(gate_up[:, :ffn]))
        writer.add_tensor(f"{blk}.ffn_up_exps.weight", np.ascontiguousarray(gate_up[:, ffn:]))
        writer.add_tensor(f"{blk}.ffn_down_exps.weight", weights[f"{hf}.mlp.experts.down_proj"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
