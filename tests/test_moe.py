"""Mixture-of-experts decoders (Qwen3-MoE, Mixtral) against transformers: logits, greedy
tokens, KV-cache decoding, HF export, fused-expert and GGUF checkpoints; the ragged_dot
block against a dense per-expert reference; the load-balancing loss against transformers'
``load_balancing_loss_func``; per-expert LoRA."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from gguf_files import tokenizer_vocab, write_moe_gguf

import jaxpt.models as jm
from jaxpt.models import moe
from jaxpt.models.decoder import KVCache
from jaxpt.models.lora import LoRAParam, LoRASpec, add_adapters, merge_adapters
from jaxpt.models.peft_io import AdapterError, write_adapter
from jaxpt.models.safetensors_io import write_safetensors
from jaxpt.sampling import generate

VOCAB = len(tokenizer_vocab()[0])  # the GGUF writer's tokenizer
COMMON = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "num_experts_per_tok": 2,
    "max_position_embeddings": 128, "tie_word_embeddings": False,
    "attn_implementation": "eager",
}
FAMILIES = {
    "qwen3_moe": (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig, {
        "intermediate_size": 64, "moe_intermediate_size": 16, "num_experts": 8,
        "norm_topk_prob": True,
    }),
    "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig, {
        "intermediate_size": 16, "num_local_experts": 4,
    }),
}
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int32)


@nnx.jit
def _forward(model, ids, segment_ids):
    return model(ids, segment_ids=segment_ids)


def logits(model, ids=IDS, segment_ids=None) -> np.ndarray:
    segment_ids = np.ones_like(ids) if segment_ids is None else segment_ids
    return np.asarray(_forward(model, ids, segment_ids))


def hf_logits(hf, ids=IDS, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        mask = None if attention_mask is None else torch.as_tensor(attention_mask)
        return hf(torch.as_tensor(ids, dtype=torch.long), attention_mask=mask).logits.numpy()


@dataclasses.dataclass
class Pair:
    hf: transformers.PreTrainedModel
    path: str
    model: jm.CausalLM


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Pair]:
    out = {}
    for name, (cls, config_cls, extra) in FAMILIES.items():
        torch.manual_seed(0)
        hf = cls(config_cls(**COMMON, **extra)).eval()
        path = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(path)
        out[name] = Pair(hf, path, jm.from_pretrained(path))
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(pairs, name):
    pair = pairs[name]
    assert pair.model.config.num_experts == (8 if name == "qwen3_moe" else 4)
    diff = np.abs(logits(pair.model) - hf_logits(pair.hf)).max()
    assert diff < 1e-4, f"{name}: max |logit diff| {diff:.3g}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_tokens_match_transformers(pairs, name):
    pair = pairs[name]
    prompt = IDS[0, :6]
    ours = generate(pair.model, [prompt.tolist()], max_new_tokens=4).tokens[0]
    with torch.no_grad():
        theirs = pair.hf.generate(torch.as_tensor(prompt[None], dtype=torch.long),
                                  max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert list(ours)[:4] == theirs[0, 6:].tolist()


@nnx.jit
def _cached(model, ids, cache):
    return model(ids, cache=cache)


def test_kv_cache_decode_equals_full_forward(pairs):
    model = pairs["qwen3_moe"].model
    full = logits(model)
    cache = KVCache.init(model.config, 2, 16)
    prefill, cache = _cached(model, IDS[:, :10], cache)
    step1, cache = _cached(model, IDS[:, 10:11], cache)
    step2, cache = _cached(model, IDS[:, 11:12], cache)
    np.testing.assert_allclose(np.asarray(prefill), full[:, :10], atol=1e-5)
    np.testing.assert_allclose(np.asarray(step1)[:, 0], full[:, 10], atol=1e-5)
    np.testing.assert_allclose(np.asarray(step2)[:, 0], full[:, 11], atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_reloads_in_transformers(pairs, name, tmp_path):
    pair = pairs[name]
    jm.save_pretrained(pair.model, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager").eval()
    assert type(reloaded) is type(pair.hf)
    np.testing.assert_allclose(hf_logits(reloaded), hf_logits(pair.hf), atol=1e-6)


def test_fused_expert_checkpoint_loads(pairs, tmp_path):
    """transformers 5's in-memory layout (gate_up_proj [E, 2F, D]) as checkpoint tensors."""
    pair = pairs["qwen3_moe"]
    state = {k: v.detach().numpy() for k, v in pair.hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    write_safetensors(str(tmp_path / "model.safetensors"), sorted(state.items()))
    pair.hf.config.save_pretrained(str(tmp_path))
    model = jm.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(logits(model), logits(pair.model))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gguf_matches_transformers(pairs, name, tmp_path):
    pair = pairs[name]
    path = write_moe_gguf(str(tmp_path / f"{name}.gguf"), pair.hf, f"tiny {name}")
    model = jm.from_pretrained(path)
    assert model.config.architecture == pair.model.config.architecture
    assert model.config.num_experts == pair.model.config.num_experts
    diff = np.abs(logits(model) - hf_logits(pair.hf)).max()
    assert diff < 1e-4, f"{name} GGUF: max |logit diff| {diff:.3g}"


def test_mixed_dense_and_sparse_layers_are_refused():
    config = transformers.Qwen3MoeConfig(**{**COMMON, **FAMILIES["qwen3_moe"][2]},
                                         decoder_sparse_step=2)
    with pytest.raises(jm.UnsupportedArchitectureError, match="decoder_sparse_step"):
        jm.config_from_hf(config)
    config = transformers.Qwen3MoeConfig(**{**COMMON, **FAMILIES["qwen3_moe"][2]},
                                         mlp_only_layers=[1])
    with pytest.raises(jm.UnsupportedArchitectureError, match="mlp_only_layers"):
        jm.config_from_hf(config)


# ------------------------------------------------------------------------ the block itself


def _dense_reference(block: moe.MoE, x_nd):
    """Every expert on every token, weighted by the routing weights (0 off the top k)."""
    logits_ne = x_nd @ block.gate.weight[...].T
    weights_nk, experts_nk = moe.route(logits_ne, block.top_k, block.normalize)
    dense_ne = jnp.sum(jax.nn.one_hot(experts_nk, block.num_experts) * weights_nk[..., None], 1)
    ex = block.experts
    gate = jnp.einsum("nd,efd->enf", x_nd, ex.gate_proj.weight[...])
    up = jnp.einsum("nd,efd->enf", x_nd, ex.up_proj.weight[...])
    out_end = jnp.einsum("enf,edf->end", jax.nn.silu(gate) * up, ex.down_proj.weight[...])
    return jnp.einsum("end,ne->nd", out_end, dense_ne)


def test_ragged_block_equals_dense_reference(pairs):
    config = pairs["qwen3_moe"].model.config
    block = nnx.jit(lambda: moe.MoE(config, rngs=nnx.Rngs(1), dtype=jnp.float32,
                                    param_dtype=jnp.float32))()

    def loss(block, fn):
        return jnp.sum(jnp.sin(fn(block)))

    @nnx.jit
    def outputs_and_grads(block):  # both paths and both gradients: one compiled program
        x_btd = jax.random.normal(jax.random.key(2), (3, 5, config.hidden_size))
        ours = lambda b: b(x_btd).reshape(15, -1)
        ref = lambda b: _dense_reference(b, x_btd.reshape(15, -1))
        return ours(block), ref(block), nnx.grad(loss)(block, ours), nnx.grad(loss)(block, ref)

    out, ref_out, grads, ref_grads = outputs_and_grads(block)
    np.testing.assert_allclose(out, ref_out, atol=1e-6)
    for (path, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads),
                                 strict=True):
        np.testing.assert_allclose(g[...], r[...], atol=1e-6, err_msg=str(path))
    assert float(np.abs(np.asarray(grads["gate"]["weight"][...])).max()) > 0  # router learns


# ------------------------------------------------------------------ router losses and stats


@nnx.jit
def _router_stats(model, ids, segment_ids):
    with moe.collect_router_stats() as sink:
        model(ids, segment_ids=segment_ids)
    return moe.take_router_stats(model, sink)


def test_aux_loss_matches_transformers(pairs):
    pair = pairs["qwen3_moe"]
    mask = np.ones_like(IDS)
    mask[1, 8:] = 0  # right padding
    stats = _router_stats(pair.model, IDS, mask)
    assert stats.expert_tokens.shape == (2, 8)
    np.testing.assert_array_equal(stats.tokens, [20, 20])
    np.testing.assert_array_equal(stats.expert_tokens.sum(-1), [40, 40])  # top-2 picks

    with torch.no_grad():
        out = pair.hf(torch.as_tensor(IDS, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                      output_router_logits=True)
    theirs = float(out.aux_loss)
    assert abs(float(moe.load_balancing_loss(stats)) - theirs) < 1e-5
    # By hand from the same router logits: f_e * P_e pooled over layers and real tokens.
    router = np.stack([r.numpy() for r in out.router_logits])  # [L, N, E]
    keep = mask.reshape(-1).astype(bool)
    probs = np.exp(router - router.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top2 = np.argsort(-probs, -1)[..., :2]
    picks = (np.arange(8) == top2[..., None]).sum(-2)[:, keep]  # [L, real, E]
    f, p = picks.sum((0, 1)) / picks[..., 0].size, probs[:, keep].sum((0, 1)) / picks[..., 0].size
    assert abs(8 * float((f * p).sum()) - theirs) < 1e-5
    logz = np.log(np.exp(router).sum(-1))[:, keep]
    assert abs(float(moe.router_z_loss(stats)) - float((logz**2).mean())) < 1e-4


def test_padding_and_scan_do_not_change_router_stats(pairs):
    model = pairs["qwen3_moe"].model
    padded = np.concatenate([IDS, np.zeros((2, 4), np.int32)], axis=1)
    mask = np.concatenate([np.ones_like(IDS), np.zeros((2, 4), np.int32)], axis=1)
    a = _router_stats(model, IDS, np.ones_like(IDS))
    b = _router_stats(model, padded, mask)
    scanned = nnx.merge(*nnx.split(model))
    scanned.scan_layers = True
    c = _router_stats(scanned, IDS, np.ones_like(IDS))
    for other in (b, c):
        np.testing.assert_allclose(moe.load_balancing_loss(other), moe.load_balancing_loss(a),
                                   rtol=1e-6)
        np.testing.assert_allclose(other.expert_tokens, a.expert_tokens)
        np.testing.assert_allclose(other.z_sum, a.z_sum, rtol=1e-5)


# ------------------------------------------------------------------------------- LoRA


def test_expert_lora(pairs, tmp_path):
    model = nnx.merge(*nnx.split(pairs["qwen3_moe"].model))
    base = logits(model)
    paths = add_adapters(model, LoRASpec(rank=2, alpha=4.0), seed=0)
    assert "model.layers.1.mlp.experts.down_proj" in paths
    assert "model.layers.0.self_attn.q_proj" in paths
    lora = model.model.layers.mlp.experts.gate_proj.lora
    assert lora.a.shape == (2, 8, 32, 2) and lora.b.shape == (2, 8, 2, 16)
    np.testing.assert_array_equal(logits(model), base)  # B = 0: no change
    for linear in (model.model.layers.mlp.experts.gate_proj, model.model.layers.mlp.experts.down_proj):
        b = linear.lora.b
        b[...] = 0.1 * jax.random.normal(jax.random.key(3), b.shape)
    adapted = logits(model)
    assert np.abs(adapted - base).max() > 1e-4
    np.testing.assert_allclose(logits(merge_adapters(model)), adapted, atol=1e-5)
    grad_fn = nnx.grad(lambda m: jnp.sum(jnp.sin(m(IDS))), argnums=nnx.DiffState(0, LoRAParam))
    grads = nnx.jit(grad_fn)(model)  # compiled: op by op, a gradient through the MoE is slow
    expert_b = grads["model"]["layers"]["mlp"]["experts"]["up_proj"]["lora"]["b"][...]
    assert expert_b.shape == (2, 8, 2, 16) and float(jnp.abs(expert_b).max()) > 0
    with pytest.raises(AdapterError, match="MoE experts"):
        write_adapter(model, str(tmp_path / "adapter"), base_model=None, dropout=0.0)


def test_attention_lora_exports_to_peft(pairs, tmp_path):
    peft = pytest.importorskip("peft")
    pair = pairs["qwen3_moe"]
    model = nnx.merge(*nnx.split(pair.model))
    add_adapters(model, LoRASpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj")), seed=0)
    b = model.model.layers.self_attn.q_proj.lora.b
    b[...] = 0.1 * jax.random.normal(jax.random.key(4), b.shape)
    write_adapter(model, str(tmp_path), base_model=pair.path, dropout=0.0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(pair.path,
                                                           attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    assert os.path.exists(tmp_path / "adapter_config.json")
    np.testing.assert_allclose(hf_logits(peft_model), logits(model), atol=1e-4)


# ------------------------------------------------------------------- through the train step


def test_router_losses_are_added_per_unit_of_the_task_loss(pairs):
    from jaxpt.step import StepContext, with_router_losses
    from jaxpt.tasks.sft import sft_loss

    model = pairs["qwen3_moe"].model
    mask = np.ones_like(IDS)
    mask[1, 9:] = 0
    batch = {"input_ids": IDS, "target_ids": np.roll(IDS, -1, 1), "segment_ids": mask,
             "positions": np.broadcast_to(np.arange(12, dtype=np.int32), IDS.shape),
             "loss_mask": mask.astype(np.float32)}
    ctx = StepContext(rng=jax.random.key(0), step=jnp.zeros((), jnp.int32))

    @nnx.jit
    def both(model):
        plain = sft_loss(model, batch, ctx)
        wrapped = with_router_losses(sft_loss, aux_weight=None, z_weight=0.5)(model, batch, ctx)
        return plain, wrapped, _router_stats(model, IDS, mask)

    plain, wrapped, stats = both(model)
    aux, z = moe.load_balancing_loss(stats), moe.router_z_loss(stats)
    coef = model.config.router_aux_loss_coef
    assert coef == 0.001
    expected = plain.numerator + plain.denominator * (coef * aux + 0.5 * z)
    np.testing.assert_allclose(wrapped.numerator, expected, rtol=1e-6)
    np.testing.assert_allclose(wrapped.metrics["moe_aux_loss"] / wrapped.denominator, aux,
                               rtol=1e-6)
    per_layer = [wrapped.metrics[f"moe_aux_loss/layer_{i}"] for i in range(2)]
    np.testing.assert_allclose(per_layer, moe.layer_load_balancing_losses(stats) * 21, rtol=1e-6)
    tokens = [wrapped.totals[f"moe_tokens_per_expert/{e}"] for e in range(8)]
    assert sum(tokens) == pytest.approx(2 * 21)  # top-2 picks of 21 real tokens per layer
