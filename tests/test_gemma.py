"""Gemma 2 and Gemma 3 (text) against transformers' eager models: logits (scanned and
one by one, padded, packed), greedy decoding through both samplers, KV-cache decode, HF
export, GGUF import, a PEFT export on Gemma 3; soft-capped attention's gradient and every
attention path against plain references; SFT masks on Gemma 3's real chat template."""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from gguf_files import write_gguf

import jaxpt.models as jm
from jaxpt.models import paged
from jaxpt.models.decoder import KVCache
from jaxpt.models.layers import (
    attention_mask,
    decode_attention,
    grouped_attention,
    resolve_attention,
    splash_attention,
)
from jaxpt.sampling import generate

VOCAB, B, T = 256, 2, 16
ATOL = 1e-4  # float32 logits, jaxpt vs transformers
_BASE = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 4,
    "query_pre_attn_scalar": 24, "max_position_embeddings": 128, "pad_token_id": 0,
    "bos_token_id": 2, "eos_token_id": 1,
}
CONFIGS = {
    # Caps small enough that they bend these weights' scores and logits.
    "gemma2": (transformers.Gemma2Config,
               {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 1.5}),
    # Local and global layers with their own rope (the global one scaled).
    "gemma3": (transformers.Gemma3TextConfig, {
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
        },
    }),
}


@dataclasses.dataclass
class Pair:
    name: str
    hf: transformers.PreTrainedModel
    path: str
    model: jm.CausalLM


def build_hf(name: str) -> transformers.PreTrainedModel:
    config_cls, overrides = CONFIGS[name]
    torch.manual_seed(0)
    config = config_cls(**{**_BASE, **overrides})
    config.architectures = [{"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[name]]
    hf = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for param_name, p in hf.named_parameters():
            if param_name.endswith("norm.weight"):  # Gemma's norms scale by 1 + w
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return hf.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory) -> Pair:
    hf = build_hf(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path)
    return Pair(request.param, hf, path, jm.from_pretrained(path))


@nnx.jit
def _forward(model, ids, positions, segment_ids):
    return model(ids, positions, segment_ids)


def jax_logits(model, ids, positions=None, segment_ids=None):
    """Logits of one compiled forward per model and shape: positions and segments are
    always passed (default: one unpadded document a row)."""
    if positions is None:
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    if segment_ids is None:
        segment_ids = np.ones(ids.shape, np.int32)
    return np.asarray(_forward(model, ids, positions, segment_ids))


def hf_logits(hf, ids, attention_mask=None, position_ids=None) -> np.ndarray:
    as_torch = lambda x: None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.long)
    with torch.no_grad():
        out = hf(input_ids=as_torch(ids), attention_mask=as_torch(attention_mask),
                 position_ids=as_torch(position_ids))
    return out.logits.float().numpy()


def random_ids(seed=0, batch=B, length=T) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, (batch, length), dtype=np.int32)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ------------------------------------------------------------------------------- logits


def test_config_reads_gemma(pair):
    c = pair.model.config
    assert (c.norm_offset, c.embed_scale, c.query_pre_attn_scalar, c.sandwich_norms) == (
        1.0, 8.0, 24.0, True)
    assert c.sliding_windows == (4, None, 4, None) and c.hidden_act == "gelu_pytorch_tanh"
    if pair.name == "gemma2":
        assert (c.attn_logit_softcap, c.final_logit_softcap, c.sliding_rope) == (1.0, 1.5, None)
    else:  # transformers' Gemma 3 applies no attention soft-capping
        assert c.qk_norm and c.attn_logit_softcap is None and c.final_logit_softcap is None
        assert c.rope_theta == 100000.0 and c.sliding_rope == (1000.0, ())


def test_logits_match_transformers_scanned_or_not(pair):
    ids = random_ids()
    expected = hf_logits(pair.hf, ids)
    actual = jax_logits(pair.model, ids)
    print(f"{pair.name}: max |logit diff| {max_diff(actual, expected):.3g}")
    assert max_diff(actual, expected) <= ATOL
    scanned = nnx.merge(*nnx.split(pair.model))
    scanned.scan_layers = True
    assert max_diff(jax_logits(scanned, ids), actual) <= 1e-5
    # What this family adds matters at these weights: without it the logits move.
    fields = ("attn_logit_softcap", "final_logit_softcap") if pair.name == "gemma2" else (
        "sliding_rope",)
    for field in fields:
        other = nnx.merge(*nnx.split(pair.model))
        other.config = dataclasses.replace(other.config, **{field: None})
        if field == "attn_logit_softcap":  # the attention keeps its own copy
            other.model.layers.self_attn.softcap = None
        assert max_diff(jax_logits(other, ids), actual) > 1e-2, field


def test_padded_and_packed_logits_match_transformers(pair):
    """Row 0: two documents packed (positions restart), each as if alone; row 1: left
    padding (segment 0), as transformers' attention mask."""
    ids = random_ids(seed=1)
    segments = np.ones((B, T), np.int32)
    segments[0, 9:], segments[1, :5] = 2, 0
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    positions[0, 9:] -= 9
    positions[1] = np.maximum(np.arange(T) - 5, 0)
    actual = jax_logits(pair.model, ids, positions, segments)
    assert np.isfinite(actual).all()  # padding too: a masked loss must not see NaN
    for span in (slice(0, 9), slice(9, T)):
        assert max_diff(actual[0, span], hf_logits(pair.hf, ids[:1, span])[0]) <= ATOL
    mask = (segments[1:] != 0).astype(np.int32)
    expected = hf_logits(pair.hf, ids[1:], attention_mask=mask, position_ids=positions[1:])
    assert max_diff(actual[1, 5:], expected[0, 5:]) <= ATOL


def test_kv_cache_decode_matches_full_forward(pair):
    prompt_len = 5
    ids = random_ids(seed=3)
    full = jax_logits(pair.model, ids)
    graphdef, state = nnx.split(pair.model)

    @jax.jit
    def forward(state, ids, cache):
        return nnx.merge(graphdef, state)(ids, cache=cache)

    logits, cache = forward(state, ids[:, :prompt_len], KVCache.init(pair.model.config, B, T))
    steps = [np.asarray(logits)]
    for t in range(prompt_len, T):
        logits, cache = forward(state, ids[:, t : t + 1], cache)
        steps.append(np.asarray(logits))
    assert max_diff(np.concatenate(steps, axis=1), full) <= 1e-5


def test_greedy_tokens_match_transformers_generate(pair):
    """Gemma 2 through the paged engine, Gemma 3 through the static sampler's
    feature-major decode step."""
    sampler = "paged" if pair.name == "gemma2" else "static"
    prompts = [random_ids(seed=5, batch=1, length=7)[0].tolist(), [5, 9, 14]]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = pair.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                   min_new_tokens=8, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    out = generate(pair.model, prompts, max_new_tokens=8, sampler=sampler)
    assert out.tokens == expected


def test_save_pretrained_reloads_in_transformers(pair, tmp_path):
    jm.save_pretrained(pair.model, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager", dtype=torch.float32
    )
    assert type(hf) is type(pair.hf)
    saved, original = hf.state_dict(), pair.hf.state_dict()
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    ids = random_ids(seed=4)
    assert max_diff(hf_logits(hf, ids), jax_logits(pair.model, ids)) <= ATOL


# --------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize(("arch", "layers"), [("gemma2", 2), ("gemma3", 6)])
def test_gguf_logits_match_transformers(tmp_path, arch, layers):
    """llama.cpp's layout (four norms a layer, stored as 1 + w), read by jaxpt and by
    transformers' own GGUF loader; Gemma 3's six layers hold one global layer."""
    path = write_gguf(str(tmp_path / f"{arch}.gguf"), arch, "F32", hidden=64, ffn=128,
                      layers=layers, heads=2, kv_heads=1, sliding_window=4,
                      rope_theta=10000.0 if arch == "gemma2" else 1e6)
    model = jm.from_pretrained(path)
    c = model.config
    assert c.norm_offset == 1.0 and c.sliding_windows == (4,) * (layers - 1) + (None,)
    if arch == "gemma2":
        assert (c.attn_logit_softcap, c.final_logit_softcap) == (50.0, 30.0)
    else:
        assert (c.rope_theta, c.sliding_rope) == (1e6, (10000.0, ()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=f"{arch}.gguf", dtype=torch.float32
    ).eval()
    ids = np.random.default_rng(0).integers(0, c.vocab_size, (2, 12))
    expected = hf_logits(hf, ids)
    assert float(np.abs(expected).max()) > 1.0
    diff = max_diff(jax_logits(model, ids), expected)
    print(f"{arch} GGUF: max |logit diff| {diff:.3g}")
    assert diff <= ATOL


# --------------------------------------------------------------------------------- LoRA


def test_lora_on_gemma3_exports_a_peft_adapter_with_the_same_logits(pair, tmp_path):
    if pair.name != "gemma3":
        pytest.skip("one family is enough")
    import peft

    from jaxpt.models.lora import LoRASpec, adapted, add_adapters
    from jaxpt.models.peft_io import write_adapter

    model = nnx.merge(*nnx.split(pair.model))  # a copy: the pair's model stays as loaded
    add_adapters(model, LoRASpec(4, 8.0), seed=0)
    for lora in adapted(model).values():
        lora.b[...] = jax.random.normal(jax.random.key(1), lora.b.shape) * 0.1
    ids = random_ids(seed=6)
    ours = jax_logits(model, ids)
    assert max_diff(ours, jax_logits(pair.model, ids)) > 1e-2
    write_adapter(model, str(tmp_path), base_model=pair.path, dropout=0.0)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        pair.path, attn_implementation="eager", dtype=torch.float32
    )
    theirs = hf_logits(peft.PeftModel.from_pretrained(base, str(tmp_path)).eval(), ids)
    assert max_diff(theirs, ours) <= ATOL


# ---------------------------------------------------------------------- attention paths

SCALE, CAP = 0.3, 2.0


def _plain_attention(q_btnh, k_bskh, v_bskh, mask_b1ts):
    """Soft-capped attention written out: repeated kv heads, one softmax."""
    group = q_btnh.shape[2] // k_bskh.shape[2]
    k_bsnh, v_bsnh = (jnp.repeat(x, group, axis=2) for x in (k_bskh, v_bskh))
    scores = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_bsnh) * SCALE
    scores = jnp.tanh(scores / CAP) * CAP
    scores = jnp.where(mask_b1ts, scores, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v_bsnh)


def _qkv(t, seed=0, n=4, k=2, h=16):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, t, m, h)) * 2, jnp.float32) for m in (n, k, k))


def _self_mask(t, window=None):
    segments = np.ones((B, t), np.int32)
    segments[1, t - 3:] = 0  # padding
    segments, slots = jnp.asarray(segments), jnp.arange(t, dtype=jnp.int32)
    positions = jnp.broadcast_to(slots, (B, t))
    return attention_mask(segments, slots, positions, segments, slots, positions, window)


def test_softcapped_attention_and_its_gradient_match_autodiff_of_a_plain_one():
    q, k, v = _qkv(12)
    mask = _self_mask(12, window=5)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    real = (mask.q_segment_bt != 0)[:, :, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v) * weights, 0.0))

    ours = lambda q, k, v: grouped_attention(q, k, v, mask, scale=SCALE, softcap=CAP)
    plain = lambda q, k, v: _plain_attention(q, k, v, mask.dense)
    assert max_diff(jnp.where(real, ours(q, k, v), 0), jnp.where(real, plain(q, k, v), 0)) < 1e-5
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(loss(plain), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads, expected):
        assert max_diff(got, want) < 1e-5 * max(1.0, float(jnp.abs(want).max()))


def test_decode_paged_and_splash_paths_soft_cap_and_scale():
    # Decode against a cache in blocks (200 slots filled of 256) and in one piece.
    @jax.jit
    def decode_paths(q, k, v, filled):  # filled: traced, as the engine passes it
        mask_b11s = jnp.broadcast_to(jnp.arange(256) < 200, (B, 1, 1, 256))
        expected = _plain_attention(q[:, 199:200], k, v, mask_b11s)
        k_bkhs, v_bksh = jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2)
        decode = functools.partial(decode_attention, scale=SCALE, softcap=CAP)
        return expected, [decode(q[:, 199:200], k_bkhs, v_bksh, mask_b11s, f)
                          for f in (None, filled)]

    expected, decoded = decode_paths(*_qkv(256, seed=2), 200)
    for out in decoded:  # filled: None, 200
        assert max_diff(out, expected) < 1e-5
    # Paged (split pages of 4 slots): a prefill chunk and a decode row.
    t, page = 8, 4

    @jax.jit
    def paged_paths(q, k, v):
        geometry = types.SimpleNamespace(num_kv_heads=2, head_dim=16, num_layers=1)
        cache = paged.PagedKVCache.init(geometry, num_pages=1 + B * t // page, page_size=page)
        cache = cache.with_table(np.arange(1, 1 + B * t // page).reshape(B, t // page))
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))
        pmask = paged.PagedMask(positions, jnp.ones((B, t), bool), window=3)
        layer = paged.write(cache.layer(0), k, v, pmask)
        i, j = np.arange(t)[:, None], np.arange(t)[None, :]
        window_mask = jnp.broadcast_to((j <= i) & (i - j < 3), (B, 1, t, t))
        expected = _plain_attention(q, k, v, window_mask)
        prefill = paged.attend(q, layer, pmask, scale=SCALE, softcap=CAP)
        last = paged.PagedMask(positions[:, -1:], jnp.ones((B, 1), bool), window=3)
        decode = paged.attend(q[:, -1:], layer, last, scale=SCALE, softcap=CAP)
        return expected, prefill, decode

    expected, prefill, decode = paged_paths(*_qkv(t, seed=3))
    assert max_diff(prefill, expected) < 1e-5
    assert max_diff(decode, np.asarray(expected)[:, -1:]) < 1e-5

    # Splash (its interpreter) over 128 tokens, one row.
    @jax.jit
    def splash_and_reference(q, k, v):
        q, k, v = (x[:1] for x in (q, k, v))
        mask = jax.tree.map(lambda x: x[:1], _self_mask(128, window=16))
        real = (mask.q_segment_bt != 0)[:, :, None, None]
        out = splash_attention(q, k, v, mask, interpret=True, scale=SCALE, softcap=CAP)
        expected = grouped_attention(q, k, v, mask, scale=SCALE, softcap=CAP)
        return jnp.where(real, out, 0), jnp.where(real, expected, 0)

    assert max_diff(*splash_and_reference(*_qkv(128, seed=4, n=2, k=1, h=64))) < 1e-4


def test_xla_and_cudnn_are_not_chosen_for_soft_capped_attention():
    q, k, _ = _qkv(4)
    mask = _self_mask(4)
    assert resolve_attention("einsum", q, k, mask, CAP) == "einsum"
    for implementation in ("xla", "cudnn"):
        assert resolve_attention(implementation, q, k, mask) == implementation
        with pytest.raises(ValueError, match="cannot soft-cap"):
            resolve_attention(implementation, q, k, mask, CAP)


# ------------------------------------------------------------------------- chat masks

# Gemma 3's chat template (google/gemma-3-1b-it, tokenizer_config.json): no system role of
# its own (a system message opens the first user turn), replies trimmed, "model" turns.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)
GEMMA_SPECIALS = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")


def gemma_tokenizer():
    """The shipped tokenizer with Gemma's special tokens and chat template: its eos
    (``<eos>``) is not what ends a turn (``<end_of_turn>``)."""
    from jaxpt.data import load_tokenizer

    tok = load_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(GEMMA_SPECIALS)})
    tok.bos_token, tok.eos_token = "<bos>", "<eos>"
    tok.chat_template = GEMMA3_TEMPLATE
    return tok


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  2+3?  "},
    {"role": "assistant", "content": " 5\n"},  # the template trims it
    {"role": "user", "content": "And 2+4?"},
    {"role": "assistant", "content": "6"},
]


def test_sft_mask_on_gemma3_template_trains_each_reply_and_its_end_of_turn():
    from jaxpt.data import chat, eos_token_ids

    tok = gemma_tokenizer()
    ids, mask = chat.render_with_assistant_mask(tok, CONVERSATION)
    # The same sequence built turn by turn: special tokens split the text.
    encode = lambda text: list(tok(text, add_special_tokens=False)["input_ids"])
    bos, start, end = tok.convert_tokens_to_ids(["<bos>", "<start_of_turn>", "<end_of_turn>"])
    turns = [("user", "Be brief.\n\n2+3?", 0), ("model", "5", 1), ("user", "And 2+4?", 0),
             ("model", "6", 1)]
    want_ids, want_mask = [bos], [0]
    for role, content, trained in turns:
        header, body = encode(role + "\n"), encode(role + "\n" + content)
        assert body[: len(header)] == header
        want_ids += [start, *body, end, *encode("\n")]
        want_mask += [0] * (1 + len(header)) + [trained] * (len(body) - len(header) + 1)
        want_mask += [0] * len(encode("\n"))
    assert (ids, mask) == (want_ids, want_mask)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "5<end_of_turn>6<end_of_turn>"
    assert end in eos_token_ids(tok)  # the samplers stop where SFT taught the model to
    # Prompt-completion rows (train_from) train the last reply only.
    ids_l, mask_l = chat.tokenize_sft({"messages": CONVERSATION, "train_from": 4}, tok)
    assert tok.decode(ids_l[mask_l]) == "6<end_of_turn>"
