"""The decoder against transformers' PyTorch models: logits, checkpoints, sharding, caches.

Each architecture is a tiny random transformers model, built once per module, whose
weights are re-drawn at a scale where float32 disagreements would show (HF's own init
gives near-zero logits, zero biases and unit norms, which would hide loading bugs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

import jaxpt.models as jm
from jaxpt.models import KVCache
from jaxpt.sharding import logical_to_spec

ATOL = 1e-4
VOCAB, B, T = 128, 2, 12
_BASE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head_dim 16 the wavelengths span 6..20000, so this hits all three llama3 bands.
    "original_max_position_embeddings": 64,
}
VARIANTS = {
    "llama": (transformers.LlamaConfig, {}),
    "llama_tied": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
    "llama_bias": (transformers.LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
    "llama3_rope": (transformers.LlamaConfig, {"rope_parameters": _LLAMA3_ROPE}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 32}),
    # A window shorter than T exercises the sliding-window mask.
    "mistral": (transformers.MistralConfig, {"sliding_window": 5}),
}


@dataclasses.dataclass
class Pair:
    """One architecture as an HF torch model, its checkpoint dir and the jaxpt model."""

    name: str
    hf: transformers.PreTrainedModel
    path: str
    model: jm.CausalLM


def build_hf(config_cls, overrides, seed=0) -> transformers.PreTrainedModel:
    """A tiny random HF model in float32 with eager attention and well-scaled weights."""
    torch.manual_seed(seed)
    config = config_cls(**{**_BASE, **overrides})
    config.architectures = [config_cls.__name__.replace("Config", "ForCausalLM")]
    hf = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return hf.eval()


def make_pair(name, tmp_path_factory) -> Pair:
    """Build VARIANTS[name] in transformers, save it, and load it into jaxpt."""
    hf = build_hf(*VARIANTS[name])
    path = str(tmp_path_factory.mktemp(name))
    hf.save_pretrained(path)
    return Pair(name, hf, path, jm.from_pretrained(path))


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory) -> Pair:
    return make_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Pair:
    """The plain Llama variant, for the checks that need only one architecture."""
    return make_pair("llama", tmp_path_factory)


@nnx.jit
def _forward(model, ids, positions, segment_ids, attention_mask):
    return model(ids, positions, segment_ids, attention_mask)


def jax_logits(model, ids, positions=None, segment_ids=None, attention_mask=None) -> np.ndarray:
    """jaxpt logits as numpy (jitted, as every caller of the model is)."""
    return np.asarray(_forward(model, ids, positions, segment_ids, attention_mask))


def hf_logits(hf, ids, attention_mask=None, position_ids=None) -> np.ndarray:
    """transformers logits as numpy float32."""
    as_torch = lambda x: None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.long)
    with torch.no_grad():
        out = hf(
            input_ids=as_torch(ids),
            attention_mask=as_torch(attention_mask),
            position_ids=as_torch(position_ids),
        )
    return out.logits.float().numpy()


def random_ids(batch=B, length=T, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length), dtype=np.int32)


def padding_mask(lengths, length=T, side="right") -> np.ndarray:
    """attention_mask [B, T] with ``lengths[b]`` real tokens on the given side."""
    idx = np.arange(length)[None, :]
    lengths = np.asarray(lengths)[:, None]
    real = idx < lengths if side == "right" else idx >= length - lengths
    return real.astype(np.int32)


def assert_close(actual, expected, atol=ATOL):
    diff = float(np.max(np.abs(actual - expected)))
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


# --------------------------------------------------------------------------- parity


def test_rope_frequencies_match_hf(pair):
    inv_freq = pair.model.config.inv_freq()
    np.testing.assert_allclose(inv_freq, pair.hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    if pair.name == "llama3_rope":  # the scaled path is really taken
        default = dataclasses.replace(pair.model.config, rope_scaling=()).inv_freq()
        assert not np.allclose(inv_freq, default)


def test_legacy_rope_scaling_config_matches_hf():
    """A transformers-4 config.json (``rope_scaling`` + ``rope_theta``) reads the same."""
    legacy = {
        **_BASE,
        "model_type": "llama",
        "rope_theta": 5000.0,
        "rope_scaling": {k: v for k, v in _LLAMA3_ROPE.items() if k != "rope_theta"},
    }
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(dict(legacy)))
    inv_freq = jm.config_from_hf(dict(legacy)).inv_freq()
    np.testing.assert_allclose(inv_freq, hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


def test_logits_match_hf(pair):
    ids = random_ids()
    expected = hf_logits(pair.hf, ids)
    assert np.abs(expected).max() > 1.0  # weights are scaled so differences would show
    assert_close(jax_logits(pair.model, ids), expected)


def test_final_hidden_matches_hf(llama):
    ids = random_ids()
    with torch.no_grad():
        expected = llama.hf.model(torch.as_tensor(ids, dtype=torch.long)).last_hidden_state
    hidden = nnx.jit(lambda m, x: m(x, return_hidden=True))(llama.model, ids)
    assert_close(np.asarray(hidden), expected.numpy())


def test_per_layer_sliding_windows_match_hf(tmp_path):
    """Qwen2 with ``max_window_layers=1``: layer 0 attends fully, layer 1 in a window."""
    overrides = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    hf = build_hf(transformers.Qwen2Config, overrides)
    hf.save_pretrained(str(tmp_path))
    model = jm.from_pretrained(str(tmp_path))
    assert model.config.sliding_windows == (None, 4)
    ids = random_ids(seed=11)
    actual = jax_logits(model, ids)
    assert_close(actual, hf_logits(hf, ids))
    # Scanned, each layer's window travels with it and picks its mask in the scan body.
    scanned = jm.from_pretrained(str(tmp_path), scan_layers=True)
    assert_close(jax_logits(scanned, ids), actual, atol=1e-5)
    model.config = dataclasses.replace(model.config, sliding_windows=(None, None))
    assert np.max(np.abs(jax_logits(model, ids) - actual)) > 0.1  # the window mattered


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_logits_match_hf(pair, side):
    ids = random_ids(seed=1)
    mask = padding_mask([T, 7], side=side)
    # jaxpt counts positions over real tokens; give HF the same explicit position_ids.
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = hf_logits(pair.hf, ids, attention_mask=mask, position_ids=positions)
    actual = jax_logits(pair.model, ids, attention_mask=mask)
    assert np.isfinite(actual).all()  # padding rows too: a masked loss must not see NaN
    real = mask.astype(bool)
    assert_close(actual[real], expected[real])


def test_packed_documents_match_separate_runs(pair):
    """Documents packed in one row (segments 1, 2, 3; positions restarting at 0) give the
    logits of each document run alone. Two lengths keep compiles few; 6 > mistral's window."""
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, VOCAB, n, dtype=np.int32) for n in (6, 3, 3)]

    def pack(row_docs):
        ids, segments, positions = (np.zeros(T, np.int32) for _ in range(3))
        start = 0
        for seg, doc in enumerate(row_docs, start=1):
            span = slice(start, start + len(doc))
            ids[span], segments[span], positions[span] = doc, seg, np.arange(len(doc))
            start += len(doc)
        return ids, segments, positions

    # Row 0 fills T exactly; row 1 holds the short documents, then padding (segment 0).
    rows = [pack(docs), pack(docs[1:])]
    ids, segments, positions = (np.stack(parts) for parts in zip(*rows))
    packed = jax_logits(pair.model, ids, positions, segments)
    assert np.isfinite(packed).all()

    starts = np.cumsum([0, 6, 3, 3])
    for i, doc in enumerate(docs):
        alone_hf = hf_logits(pair.hf, doc[None])[0]
        assert_close(
            packed[0, starts[i] : starts[i + 1]], jax_logits(pair.model, doc[None])[0], 1e-5
        )
        assert_close(packed[0, starts[i] : starts[i + 1]], alone_hf)
        if i:
            assert_close(packed[1, starts[i] - 6 : starts[i + 1] - 6], alone_hf)


# --------------------------------------------------------------------------- KV cache


def test_kv_cache_decode_matches_full_forward(pair):
    """Prefill, then one token at a time, gives the logits of one full forward pass.

    Row 0 is unpadded, row 1 left-padded (as the sampler batches prompts). The decode step
    is compiled once ahead of time and reused: a compiled executable refuses arguments whose
    shapes, dtypes or shardings drift, so this also proves the cache keeps a fixed signature
    (no recompiles in steady state).
    """
    prompt_len = 5
    ids = random_ids(seed=3)
    mask = padding_mask([T, T - 3], side="left")
    full = jax_logits(pair.model, ids, attention_mask=mask)

    graphdef, state = nnx.split(pair.model)

    def forward(state, ids, mask, cache):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, cache=cache)

    cache = KVCache.init(pair.model.config, B, T + 3)  # spare slots must stay masked
    logits, cache = jax.jit(forward)(state, ids[:, :prompt_len], mask[:, :prompt_len], cache)
    decode = jax.jit(forward).lower(state, ids[:, :1], mask[:, :1], cache).compile()
    steps = [np.asarray(logits)]
    for t in range(prompt_len, T):
        logits, cache = decode(state, ids[:, t : t + 1], mask[:, t : t + 1], cache)
        steps.append(np.asarray(logits))
    decoded = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    assert_close(decoded[real], full[real], atol=1e-5)
    assert int(cache.index) == T


# --------------------------------------------------------------------------- checkpoints


def test_jaxpt_save_loads_in_transformers(pair, tmp_path):
    jm.save_pretrained(pair.model, str(tmp_path))
    assert os.path.exists(tmp_path / "model.safetensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager", dtype=torch.float32
    )
    assert type(hf) is type(pair.hf)
    # Bit-identical weights. Their logits need not be: the reloaded tensors sit in the
    # safetensors mmap (other alignment), and MKL may pick other kernels for them.
    saved, original = hf.state_dict(), pair.hf.state_dict()
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    ids = random_ids(seed=4)
    assert_close(hf_logits(hf, ids), hf_logits(pair.hf, ids), atol=1e-5)
    assert_close(jax_logits(jm.from_pretrained(str(tmp_path)), ids), hf_logits(hf, ids))


def test_layers_are_stored_stacked_and_round_trip_exactly(pair, tmp_path):
    """One array per layer weight, [L, ...] (scanned as stored, no per-call stacking), and
    load -> export writes transformers' per-layer tensors back bit for bit."""
    flat = {
        ".".join(map(str, path)): var
        for path, var in nnx.to_flat_state(nnx.state(pair.model, nnx.Param))
    }
    assert not [name for name in flat if ".layers.0." in name or ".layers.1." in name]
    up = flat["model.layers.mlp.up_proj.weight"]
    assert up.shape == (_BASE["num_hidden_layers"], 128, 64)
    assert up.get_metadata()["logical_axes"] == ("layers", "mlp", "embed")
    np.testing.assert_array_equal(
        np.asarray(up[...][1]), pair.hf.model.layers[1].mlp.up_proj.weight.detach().numpy()
    )
    jm.save_pretrained(pair.model, str(tmp_path))
    saved = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    original = safetensors.torch.load_file(os.path.join(pair.path, "model.safetensors"))
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)


def test_load_transformers_sharded_checkpoint(llama, tmp_path):
    llama.hf.save_pretrained(str(tmp_path), max_shard_size="50KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = random_ids(seed=5)
    assert_close(jax_logits(jm.from_pretrained(str(tmp_path)), ids), hf_logits(llama.hf, ids))


def test_jaxpt_sharded_save_round_trips(llama, tmp_path):
    jm.save_pretrained(llama.model, str(tmp_path), max_shard_bytes=40_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    ids = random_ids(seed=6)
    expected = hf_logits(llama.hf, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert_close(hf_logits(hf, ids), expected)
    assert_close(jax_logits(jm.from_pretrained(str(tmp_path)), ids), expected)


def test_bfloat16_save_loads_in_transformers(llama, tmp_path):
    jm.save_pretrained(llama.model, str(tmp_path), dtype="bfloat16")
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    stored = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert next(hf.parameters()).dtype == torch.bfloat16
    ids = random_ids(seed=7)
    expected = hf_logits(llama.hf, ids)
    tolerance = 0.05 * np.abs(expected).max()
    assert np.max(np.abs(hf_logits(hf, ids) - expected)) < tolerance
    reloaded = jm.from_pretrained(str(tmp_path))  # upcast to float32 parameters
    assert reloaded.model.embed_tokens.weight[...].dtype == jnp.float32
    assert np.max(np.abs(jax_logits(reloaded, ids) - expected)) < tolerance


# --------------------------------------------------------------------------- errors


def _write_config(path, config: dict):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def test_unsupported_architecture_is_named(tmp_path):
    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2)
    gpt2.architectures = ["GPT2LMHeadModel"]
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(jm.UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        jm.from_pretrained(str(tmp_path / "gpt2"))

    foo = {**_BASE, "model_type": "llama", "architectures": ["FooForCausalLM"]}
    _write_config(str(tmp_path / "foo"), foo)
    with pytest.raises(jm.UnsupportedArchitectureError, match="FooForCausalLM"):
        jm.from_pretrained(str(tmp_path / "foo"))
    with pytest.raises(jm.UnsupportedArchitectureError, match="FooForCausalLM"):
        jm.init_model({k: v for k, v in foo.items() if k != "model_type"})


def _rewrite_checkpoint(src, dst, edit):
    """Copy an HF checkpoint dir, passing its tensors through ``edit(dict) -> dict``."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        _write_config(dst, json.load(f))
    tensors = safetensors.torch.load_file(os.path.join(src, "model.safetensors"))
    safetensors.torch.save_file(edit(tensors), os.path.join(dst, "model.safetensors"))


def test_missing_tensor_is_named(llama, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite_checkpoint(
        llama.path, str(tmp_path), lambda t: {k: v for k, v in t.items() if k != name}
    )
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        jm.from_pretrained(str(tmp_path))


def test_wrong_shape_is_named_with_both_shapes(llama, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_checkpoint(llama.path, str(tmp_path), lambda t: {**t, name: torch.zeros(16, 64)})
    with pytest.raises(ValueError) as info:
        jm.from_pretrained(str(tmp_path))
    message = str(info.value)
    assert name in message and "(16, 64)" in message and "(32, 64)" in message


# --------------------------------------------------------------------------- sharding


def test_sharded_forward_matches_single_device(llama, mesh8, tmp_path):
    sharded = jm.from_pretrained(llama.path, mesh=mesh8)
    q_spec = sharded.model.layers.self_attn.q_proj.weight[...].sharding.spec
    assert q_spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")  # layers replicated
    assert len(sharded.model.layers.mlp.down_proj.weight[...].sharding.device_set) == 8
    embed = sharded.model.embed_tokens.weight[...]
    assert embed.addressable_shards[0].data.shape == (VOCAB // 2, 32)  # vocab/tensor, embed/fsdp

    ids = random_ids(batch=4, seed=8)  # batch 4 divides data x fsdp
    expected = jax_logits(llama.model, ids)
    with jax.set_mesh(mesh8):
        actual = _forward(sharded, ids, None, None, None)
    assert actual.sharding.spec == logical_to_spec(("batch", "seq", "vocab"), actual.shape, mesh8)
    assert_close(np.asarray(actual), expected, atol=1e-5)

    # Saving gathers each sharded tensor back whole.
    jm.save_pretrained(sharded, str(tmp_path))
    saved = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    original = safetensors.torch.load_file(os.path.join(llama.path, "model.safetensors"))
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)


def test_init_model_is_deterministic_per_seed():
    config = {**_BASE, "model_type": "qwen3", "head_dim": 32, "num_hidden_layers": 1}

    def params(seed):
        return jax.tree.leaves(nnx.state(jm.init_model(config, seed=seed), nnx.Param))

    a, b, c = params(0), params(0), params(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.allclose(x, z) for x, z in zip(a, c))


def test_bfloat16_compute_stays_close_to_float32(llama):
    model = jm.from_pretrained(llama.path, dtype="bfloat16", param_dtype="float32")
    assert model.model.layers.mlp.up_proj.weight[...].dtype == jnp.float32
    ids = random_ids(seed=9)
    expected = jax_logits(llama.model, ids)
    actual = jax_logits(model, ids)
    assert actual.dtype == np.float32 and np.isfinite(actual).all()
    assert np.max(np.abs(actual - expected)) < 0.05 * np.abs(expected).max()


def _loss_and_grad(model, ids):
    """(loss, grads, jaxpr text) of next-token cross-entropy under jax.grad, traced once."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params, rest)(ids[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    traced = jax.jit(jax.value_and_grad(loss_fn)).trace(params)
    return *traced.lower().compile()(params), str(traced.jaxpr)


@pytest.fixture(scope="module")
def no_remat_grads(llama):
    return _loss_and_grad(llama.model, jnp.asarray(random_ids(seed=10)))


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_gradient(llama, no_remat_grads, policy):
    loss, grads, jaxpr = no_remat_grads
    remat_loss, remat_grads, remat_jaxpr = _loss_and_grad(
        jm.from_pretrained(llama.path, remat=policy), jnp.asarray(random_ids(seed=10))
    )
    assert "remat" not in jaxpr and "remat" in remat_jaxpr  # the policy is really applied
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(r, g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_give_the_same_loss_and_gradient(llama, no_remat_grads, remat):
    """Deep models scan over their layers (one compiled body); the math must not change."""
    loss, grads, jaxpr = no_remat_grads
    model = jm.from_pretrained(llama.path, remat=remat, scan_layers=True)
    scan_loss, scan_grads, scan_jaxpr = _loss_and_grad(model, jnp.asarray(random_ids(seed=10)))
    assert "scan" not in jaxpr and "scan" in scan_jaxpr
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
    for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(scan_grads)):
        np.testing.assert_allclose(s, g, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("hidden_act", ["silu", "swish", "gelu", "gelu_pytorch_tanh"])
def test_mlp_activation_follows_the_config_as_transformers(hidden_act):
    """The MLP's activation is the config's ``hidden_act``, computed as transformers'
    ACT2FN computes it (LlamaMLP: ``down(act(gate(x)) * up(x))``)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    from jaxpt.models.layers import MLP

    hf_config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, hidden_act=hidden_act,
        mlp_bias=False,
    )
    torch.manual_seed(0)
    hf = LlamaMLP(hf_config).eval()
    config = {"hidden_size": 16, "intermediate_size": 32, "initializer_range": 0.02,
              "mlp_bias": False, "hidden_act": hidden_act}
    mlp = MLP(types.SimpleNamespace(**config), rngs=nnx.Rngs(0), dtype=jnp.float32,
              param_dtype=jnp.float32)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(mlp, name).weight[...] = jnp.asarray(getattr(hf, name).weight.detach().numpy())
    x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32) * 3
    with torch.no_grad():
        expected = hf(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-6)


def test_unknown_activation_is_named_and_registering_one_adds_it():
    from jaxpt.models import layers

    config = types.SimpleNamespace(hidden_size=8, intermediate_size=16, initializer_range=0.02,
                                   mlp_bias=False, hidden_act="relu_squared_test")
    build = lambda: layers.MLP(config, rngs=nnx.Rngs(0), dtype=jnp.float32,
                               param_dtype=jnp.float32)
    with pytest.raises(ValueError, match="relu_squared_test"):
        build()
    layers.register_activation("relu_squared_test", lambda x: jnp.square(jax.nn.relu(x)))
    try:
        mlp = build()
        x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8)), jnp.float32)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        expected = mlp.down_proj(jnp.square(jax.nn.relu(gate)) * up)
        np.testing.assert_allclose(np.asarray(mlp(x)), np.asarray(expected), rtol=1e-6)
    finally:
        del layers.ACTIVATIONS["relu_squared_test"]


@dataclasses.dataclass(frozen=True)
class _GeluConfig(jm.ModelConfig):
    hidden_act: str = "gelu_pytorch_tanh"


@pytest.mark.parametrize("hidden_act", ["silu", "gelu_pytorch_tanh"])
def test_feature_major_decode_step_equals_batch_major_with_lora(hidden_act):
    """One token per row through the cache, run feature-major ([D, B], logits [V, B]) by
    the same modules, gives the batch-major step's logits and cache (biases, LoRA)."""
    from jaxpt.models.layers import FEATURE_MAJOR
    from jaxpt.models.lora import LoRASpec, adapted, add_adapters

    base = jm.config_from_hf({**_BASE, "model_type": "qwen2"})
    config = _GeluConfig(**{**dataclasses.asdict(base), "hidden_act": hidden_act})
    model = jm.init_model(config, seed=4)
    add_adapters(model, LoRASpec(rank=4, alpha=8.0), seed=0)
    rng = np.random.default_rng(5)
    for lora in adapted(model).values():  # fresh adapters are zero: give them weight
        lora.b[...] = jnp.asarray(rng.normal(size=lora.b[...].shape) * 0.2, jnp.float32)
    ids = jnp.asarray(random_ids(seed=6))
    cache = KVCache.init(model.config, B, T)
    _, cache = nnx.jit(lambda m, ids, c: m(ids[:, :-1], cache=c))(model, ids, cache)

    @nnx.jit(static_argnames="layout")
    def step(model, token_b1, cache, layout=None):
        kwargs = {} if layout is None else {"layout": layout}
        return model(token_b1, cache=cache, **kwargs)

    logits_vb, fm_cache = step(model, ids[:, -1:], cache, FEATURE_MAJOR)
    logits_b1v, bm_cache = step(model, ids[:, -1:], cache)
    assert logits_vb.shape == (VOCAB, B) and logits_vb.dtype == jnp.float32
    np.testing.assert_allclose(logits_vb, logits_b1v[:, 0, :].T, rtol=1e-5, atol=1e-5)
    for fm, bm in zip(fm_cache.k + fm_cache.v, bm_cache.k + bm_cache.v):
        np.testing.assert_allclose(fm, bm, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="feature-major"):
        model(ids, layout=FEATURE_MAJOR)
