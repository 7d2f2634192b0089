"""Routing replay for MoE policies (``rl.routing_replay``): a forward given expert ids routes
to them (weights from its own router), the sampler records the ids it routed each token
to, and a GRPO rollout's training forward replays them."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import QWEN3_MOE_TINY, make_tiny_dir

import jaxpt.models as jm
from jaxpt.config import ConfigError, load_config
from jaxpt.loop import setup
from jaxpt.losses.policy import importance_weights
from jaxpt.models import moe
from jaxpt.models.layers import gated_activation
from jaxpt.sampling import generate
from jaxpt.step import put_batch
from jaxpt.tasks import grpo
from jaxpt.tasks.rl.batch import completion_window

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E, K, L = 4, 2, 2
IDS = np.random.default_rng(0).integers(0, 128, (2, 9)).astype(np.int32)
LC = 8


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return make_tiny_dir(str(tmp_path_factory.mktemp("replay_moe")), config=QWEN3_MOE_TINY)


@pytest.fixture(scope="module")
def model(moe_dir):
    return jm.from_pretrained(moe_dir)


@nnx.jit
def _forward(model, ids, segment_ids, routing=None):
    """Logits and the [L, B, T, k] expert ids the forward routed to."""
    with moe.collect_routing() as routed:
        logits = model(ids, segment_ids=segment_ids, routing=routing)
    return logits, routed[0]


def forward(model, ids=IDS, segment_ids=None, routing=None):
    segment_ids = np.ones_like(ids) if segment_ids is None else segment_ids
    logits, routed = _forward(model, ids, segment_ids, routing)
    return np.asarray(logits), np.asarray(routed)


# ------------------------------------------------------------------------------ the model


def test_replaying_the_own_top_k_is_bit_identical(model):
    logits, routed = forward(model)
    assert routed.shape == (L, *IDS.shape, K) and routed.dtype == np.int32
    replayed, routed_again = forward(model, routing=routed)
    np.testing.assert_array_equal(replayed, logits)
    np.testing.assert_array_equal(routed_again, routed)
    # -1 (nothing recorded) is the token's own top k: the same forward again
    np.testing.assert_array_equal(forward(model, routing=np.full_like(routed, -1))[0], logits)


def test_forced_experts_change_the_output(model):
    logits, routed = forward(model)
    shifted = (routed + 1) % E  # still k distinct experts per token, none of them its own pick
    forced_logits, forced_routed = forward(model, routing=shifted)
    np.testing.assert_array_equal(forced_routed, shifted)
    assert np.abs(forced_logits - logits).max() > 1e-3


def test_forced_weights_are_the_trainers_router_at_those_experts(model):
    """One MoE block by hand: weights are the block's own softmax at the forced experts
    (renormalized over them with norm_topk_prob), times each forced expert's gated MLP."""
    block = model.model.unstacked()[0].mlp
    x_btd = jax.random.normal(jax.random.key(1), (2, 3, 32))
    forced_btk = jnp.asarray(np.random.default_rng(2).permuted(
        np.tile(np.arange(E), (2, 3, 1)), axis=-1)[..., :K], jnp.int32)
    out_btd = block(x_btd, experts_btk=forced_btk)

    probs_bte = jax.nn.softmax(x_btd @ block.gate.weight[...].T, axis=-1)
    weights_btk = jnp.take_along_axis(probs_bte, forced_btk, axis=-1)
    if block.normalize:
        weights_btk = weights_btk / weights_btk.sum(-1, keepdims=True)
    act = gated_activation(block.experts.hidden_act)
    gate, up, down = (getattr(block.experts, n).weight[...] for n in
                      ("gate_proj", "up_proj", "down_proj"))
    expected = jnp.zeros_like(x_btd)
    for j in range(K):
        e_bt = forced_btk[..., j]
        h = act(jnp.einsum("btd,btfd->btf", x_btd, gate[e_bt]),
                jnp.einsum("btd,btfd->btf", x_btd, up[e_bt]))
        expected += weights_btk[..., j : j + 1] * jnp.einsum("btf,btdf->btd", h, down[e_bt])
    np.testing.assert_allclose(np.asarray(out_btd), np.asarray(expected), rtol=1e-5, atol=1e-6)

    # the replayed weights are differentiable in the router's logits
    logits_ne = x_btd.reshape(-1, 32) @ block.gate.weight[...].T
    grad = jax.grad(lambda z: moe.route(z, K, True, forced_btk.reshape(-1, K))[0][:, 0].sum())
    for normalize in (True, False):  # route's own weights, against the hand formula
        weights_nk, experts_nk = moe.route(logits_ne, K, normalize, forced_btk.reshape(-1, K))
        np.testing.assert_array_equal(np.asarray(experts_nk), np.asarray(forced_btk).reshape(-1, K))
        probs_nk = jnp.take_along_axis(jax.nn.softmax(logits_ne, -1), experts_nk, axis=-1)
        hand_nk = probs_nk / probs_nk.sum(-1, keepdims=True) if normalize else probs_nk
        np.testing.assert_allclose(np.asarray(weights_nk), np.asarray(hand_nk), rtol=1e-6)
    assert np.abs(np.asarray(grad(logits_ne))).max() > 0


# ---------------------------------------------------------------------------- the sampler


def test_sampler_records_the_routing_the_replay_reproduces(model):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    out = generate(model, prompts, max_new_tokens=LC, temperature=1.0, num_samples=2,
                   record_routing=True, sampler="static")
    routing_btlk, lengths = out.arrays.routing_btlk, out.arrays.lengths_b
    lp = routing_btlk.shape[1] - LC
    assert routing_btlk.shape == (4, lp + LC, L, K)
    # rows: prompt (left-padded) then completion, as an RL train row
    ids = np.zeros((4, lp + LC), np.int32)
    segments = np.zeros_like(ids)
    for r in range(4):
        prompt = prompts[r // 2]
        ids[r, lp - len(prompt) : lp], segments[r, lp - len(prompt) : lp] = prompt, 1
        ids[r, lp:], segments[r, lp : lp + lengths[r]] = out.arrays.tokens_bn[r], 1
    recorded_bt = (routing_btlk >= 0).all(-1).all(-1)
    real_bt = segments > 0
    # every real token but each completion's last (never fed back) was recorded
    last_bt = np.zeros_like(real_bt)
    last_bt[np.arange(4), lp + lengths - 1] = True
    np.testing.assert_array_equal(recorded_bt & real_bt, real_bt & ~last_bt)

    _, teacher_lbtk = forward(model, ids, segments)
    teacher_btlk = np.transpose(teacher_lbtk, (1, 2, 0, 3))
    compare = recorded_bt & real_bt
    agree = (np.sort(teacher_btlk, -1) == np.sort(routing_btlk, -1)).all(-1).all(-1)[compare]
    print(f"sampler vs teacher-forced routing: {agree.mean():.3f} of {compare.sum()} tokens agree")
    assert agree.mean() > 0.9  # float32 on a tiny model: near-ties only

    _, replayed_lbtk = forward(model, ids, segments, np.transpose(routing_btlk, (2, 0, 1, 3)))
    replayed_btlk = np.transpose(replayed_lbtk, (1, 2, 0, 3))
    np.testing.assert_array_equal(replayed_btlk[recorded_bt], routing_btlk[recorded_bt])


# ------------------------------------------------------------------------------------ GRPO


def spread_reward(prompts, completions, **kwargs):
    return [float(len(set(text)) % 3) for text in completions]


def _config(output_dir, model_path, prompts_file, **extra):
    values = {
        "output_dir": output_dir, "model.path": model_path, "data.train": prompts_file,
        "data.eval": "null", "train.batch_size": 8, "logging.progress": "false",
        "logging.tensorboard": "false", "grpo.max_prompt_length": 16,
        "grpo.max_completion_length": LC, "grpo.num_generations": 4,
        "grpo.rewards": "[{fn: 'test_routing_replay:spread_reward'}]",
        "grpo.eval_prompts": 0, "grpo.log_completions": 0, "rl.routing_replay": "true",
        "rl.importance_correction": "tis", **extra,
    }
    return load_config(os.path.join(ROOT, "configs", "grpo_arith.yaml"),
                       [f"{k}={v}" for k, v in values.items()])


def test_routing_replay_on_a_dense_model_is_a_config_error(tmp_path, tiny_dir, prompts_file):
    with pytest.raises(ConfigError, match=r"'rl\.routing_replay'.*dense"):
        _config(str(tmp_path), tiny_dir, prompts_file)


@pytest.fixture(scope="module")
def near_tie_dir(tmp_path_factory):
    """The tiny MoE with routers whose experts' rows nearly coincide (1e-6 apart, relative):
    the sampler's cached decode and the trainer's full forward, float32 both, then pick
    other experts for about a tenth of the tokens, as near-ties do in real routers."""
    from jaxpt.data import load_tokenizer

    model = jm.init_model(QWEN3_MOE_TINY, seed=0)
    gate = model.model.layers.mlp.gate.weight  # [L, E, D]
    gate[...] = gate[...][:, :1, :] + 1e-6 * gate[...]
    path = str(tmp_path_factory.mktemp("near_tie_moe"))
    jm.save_pretrained(model, path)
    load_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def grpo_step(tmp_path_factory, near_tie_dir, prompts_file, mesh1):
    """A replaying GRPO run's first rollout batch, the trainer's completion log-probs of it
    with and without replay, and the metrics of its first optimizer step."""
    config = _config(str(tmp_path_factory.mktemp("grpo_replay")), near_tie_dir, prompts_file)
    cfg = config.grpo
    with setup(config, mesh=mesh1) as run:
        with run.activate():
            batch, _ = run.source.next(run.state)
            device_batch = put_batch(batch, run.mesh)
            logprobs = jax.jit(lambda state, batch, replay: grpo.completion_logprobs(
                state.model(), batch, cfg, replay=replay)[0], static_argnums=2)
            logp = {replay: np.asarray(logprobs(run.state, device_batch, replay))
                    for replay in (True, False)}
        step_fn = run.jit_step(batch)
        _, metrics = step_fn(run.state, run.put_batch(batch))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    return batch, logp, metrics, cfg


def test_grpo_batch_carries_the_rollouts_routing(grpo_step):
    batch, _, _, cfg = grpo_step
    rows, width = batch["input_ids"].shape
    assert batch["routing"].shape == (rows, width, L, K) and batch["routing"].dtype == np.int32
    window = completion_window(width, cfg.max_completion_length)
    # the positions the loss reads were all routed by the sampler
    mask_bt = batch["completion_mask"][:, window] > 0
    assert (batch["routing"][:, window][mask_bt] >= 0).all()


def test_grpo_first_iteration_ratio_is_one_with_replay(grpo_step):
    batch, logp, metrics, cfg = grpo_step
    window = completion_window(batch["input_ids"].shape[1], cfg.max_completion_length)
    mask_bt = batch["completion_mask"][:, window] > 0
    sampler_bt = batch["old_logprobs"][:, window]
    assert mask_bt.sum() >= 8
    ratio_bt = np.exp(logp[True] - sampler_bt)
    # the trainer's old side (LogprobFinisher) replays too: the same forward's log-probs
    np.testing.assert_array_equal(batch["trainer_logprobs"][mask_bt], logp[True][mask_bt])
    kl = {}
    for replay in (True, False):
        _, m = importance_weights(jnp.asarray(logp[replay]), jnp.asarray(sampler_bt),
                                  jnp.asarray(mask_bt), "tis", 2.0)
        kl[replay] = float(np.asarray(m["mismatch_kl"])[mask_bt].mean())
    deviation = float(np.abs(ratio_bt - 1.0)[mask_bt].max())
    unreplayed = float(np.abs(np.exp(logp[False] - sampler_bt) - 1.0)[mask_bt].max())
    print(f"max |ratio - 1| with replay: {deviation:.2e}, without {unreplayed:.2e}; mismatch_kl with replay "
          f"{kl[True]:.3e}, without {kl[False]:.3e}; step mismatch_kl metric "
          f"{metrics['mismatch_kl']:.3e}, clip {metrics['clip_low'] + metrics['clip_high']}")
    assert deviation < 1e-5
    assert kl[True] <= kl[False]
    assert kl[False] > 1e3 * max(kl[True], 1e-12)  # the routers' near-ties flip experts
    assert metrics["clip_low"] + metrics["clip_high"] == 0.0
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
