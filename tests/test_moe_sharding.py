"""Expert parallelism: a tiny Qwen3-MoE on a (data=2, expert=4) mesh of the 8 emulated
devices against one device, through jaxpt's own train step (loss, router losses and
gradients), its expert weights split over the ``expert`` axis, and the expert-parallel MoE
block against the single-program block on the same inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tolerances import assert_close_to_leaf_scale

from jaxpt.models import init_model, moe
from jaxpt.models.hf_io import config_from_hf, hf_config_from_dict
from jaxpt.sharding import batch_sharding, make_mesh
from jaxpt.state import create_train_state, shardings_of
from jaxpt.step import jit_train_step, make_train_step, put_batch, with_router_losses
from jaxpt.tasks.sft import sft_loss

QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 128,
    "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "max_position_embeddings": 64, "tie_word_embeddings": False,
}
ROWS, SEQ = 8, 16


def _batch() -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 128, (ROWS, SEQ + 1)).astype(np.int32)
    segment_ids = np.ones((ROWS, SEQ), np.int32)
    segment_ids[::3, -4:] = 0  # some padding: router statistics count real tokens only
    return {
        "input_ids": ids[:, :-1], "target_ids": ids[:, 1:],
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ROWS, SEQ)).copy(),
        "segment_ids": segment_ids, "loss_mask": (segment_ids > 0).astype(np.float32),
    }


def keep_gradients() -> optax.GradientTransformation:
    """An optimizer that leaves the params alone and keeps the step's gradients as its
    state (sharded like the params), exactly as the train step computed them."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def _one_step(mesh):
    """(metrics, gradients, params) of one train step with the router losses on; the
    layers are scanned (the block runs inside the layer scan)."""
    batch = _batch()
    with jax.set_mesh(mesh):
        model = init_model(QWEN3_MOE, seed=0, mesh=mesh, scan_layers=True)
        tx = keep_gradients()
        state = create_train_state(model, tx, mesh)
        loss_fn = with_router_losses(sft_loss, aux_weight=0.1, z_weight=0.01)
        step = jit_train_step(make_train_step(loss_fn, tx), mesh, shardings_of(state), batch)
        state, metrics = step(state, put_batch(batch, mesh))
    return jax.tree.map(np.asarray, metrics), state.opt_state, state.params


@pytest.fixture(scope="module")
def steps():
    calls = []
    real = moe.expert_parallel_ffn
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(moe, "expert_parallel_ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
        one = _one_step(make_mesh({}, devices=jax.devices()[:1]))
        assert not calls  # one device: the single-program block
        parallel = _one_step(make_mesh({"data": 2, "fsdp": 1, "expert": 4}))
        assert calls  # traced through the expert-parallel block
    return one, parallel


def test_expert_parallel_step_equals_one_device(steps):
    (metrics1, grads1, _), (metrics8, grads8, _) = steps
    for key in ("loss", "moe_aux_loss", "moe_z_loss", "moe_tokens_per_expert/0"):
        np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=1e-5, err_msg=key)
    assert_close_to_leaf_scale(grads8, grads1, rtol=1e-5)
    gate = grads8["model"]["layers"]["mlp"]["experts"]["gate_proj"]["weight"]
    assert np.abs(gate).max() > 0  # the experts are trained


def test_expert_weights_are_split_over_the_expert_axis(steps):
    _, (_, _, params) = steps
    experts = params["model"]["layers"]["mlp"]["experts"]
    for name in ("gate_proj", "up_proj", "down_proj"):
        weight = experts[name]["weight"]  # [L, E, out, in]
        assert weight.sharding.spec == jax.P(None, "expert", None, None), name
        assert weight.addressable_shards[0].data.shape[1] == 8 // 4
    router = params["model"]["layers"]["mlp"]["gate"]["weight"]
    assert "expert" not in jax.tree.leaves(router.sharding.spec)  # replicated over expert


def test_expert_parallel_block_equals_single_program():
    config = config_from_hf(hf_config_from_dict(QWEN3_MOE))
    block = moe.MoE(config, rngs=nnx.Rngs(1), dtype=jnp.float32, param_dtype=jnp.float32)
    x_btd = jax.random.normal(jax.random.key(2), (8, 6, 32))
    expected = np.asarray(block(x_btd))
    mesh = make_mesh({"data": 2, "expert": 4})
    graphdef, state = nnx.split(block)
    with jax.set_mesh(mesh):
        assert moe.expert_shards(8, 8 * 6) == "expert"
        assert moe.expert_shards(8, 6) is None  # tokens the axis does not divide
        x = jax.device_put(x_btd, batch_sharding(mesh, 3))
        got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    assert moe.expert_shards(8, 8 * 6) is None  # no mesh: the single-program block
