"""PPO: the loss and the rollout finisher on a real actor-critic against hand computations,
where the KL penalty sits, minibatch epochs, the critic's learning rate, config errors, and
end-to-end runs (learning, exact resume with a reward model and the adaptive controller)."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny import TINY, train_rows

from jaxpt.config import ConfigError, load_config
from jaxpt.loop import run
from jaxpt.losses import token_logprobs
from jaxpt.models import init_model
from jaxpt.models.actor_critic import ActorCritic
from jaxpt.models.classifier import init_classifier, save_classifier
from jaxpt.optim import scale_updates
from jaxpt.step import StepContext
from jaxpt.tasks.ppo import PpoConfig, finish_arrays, ppo_loss, update_scales
from jaxpt.tasks.rl.batch import Rollout, completion_window, minibatch_rows, train_batch

pytestmark = pytest.mark.usefixtures("one_device_runs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PPO_ARITH = os.path.join(ROOT, "configs", "ppo_arith.yaml")
LC = 5  # completion budget of the hand-made batches


@pytest.fixture(scope="module")
def actor_critic():
    return ActorCritic(init_model(TINY, seed=1), critic=init_classifier(TINY, seed=2))


@pytest.fixture(scope="module")
def rollout_batch(actor_critic):
    """A train batch of 4 completions (lengths 5, 3, 1, 4; row 0's prompt left-padded) whose
    old log-probs are the policy's own, so every ratio is 1."""
    rng = np.random.default_rng(0)
    prompt_mask = np.ones((4, 6), np.int32)
    prompt_mask[0, :2] = 0
    lengths = np.array([5, 3, 1, 4])
    rollout = Rollout(
        prompt_ids=rng.integers(5, 128, (4, 6)).astype(np.int32), prompt_mask=prompt_mask,
        tokens=rng.integers(5, 128, (4, LC)).astype(np.int32), lengths=lengths,
        logprobs=np.zeros((4, LC), np.float32), truncated=np.zeros(4, bool), texts=[],
        rows=[], rewards=None, num_prompts=4,
    )
    batch = train_batch(rollout, np.zeros(4, np.float32), np.ones(4, bool))
    del batch["advantages"]
    on_policy = np.asarray(_logprobs(actor_critic.policy, batch))
    batch["old_logprobs"] = np.where(batch["completion_mask"] > 0, on_policy, 0.0).astype(
        np.float32
    )
    return batch


@nnx.jit
def _logprobs(model, batch):
    """``model``'s log-prob of every target of ``batch``, in one compiled program."""
    logits = model(batch["input_ids"], batch["positions"], batch["segment_ids"])
    return token_logprobs(logits, batch["target_ids"])


def _window(batch, key):
    return batch[key][:, completion_window(batch["input_ids"].shape[1], LC)]


def test_loss_at_ratio_one_is_minus_mean_advantage_plus_the_value_and_kl_terms(
    actor_critic, rollout_batch
):
    batch = dict(rollout_batch)
    window = completion_window(batch["input_ids"].shape[1], LC)
    mask = _window(batch, "completion_mask")
    n = mask.sum()
    advantages = np.random.default_rng(1).normal(size=mask.shape).astype(np.float32) * mask
    values = np.asarray(nnx.jit(lambda model, batch: model.values(batch, window))(
        actor_critic, batch
    ))
    batch.update(
        advantages=advantages, old_values=values * mask,
        returns=(values + 1.0) * mask,  # every valid token: 0.5 * (v - R)^2 = 0.5, unclipped
        ref_logprobs=(_window(batch, "old_logprobs") - 0.1) * mask,
    )
    ctx = StepContext(jax.random.key(0), jnp.int32(0))
    configs = [
        PpoConfig(max_completion_length=LC, vf_coef=0.3, rewards=[]),
        # kl_penalty: loss adds kl_coef * k3 per token; ref - logp = -0.1 everywhere.
        PpoConfig(max_completion_length=LC, vf_coef=0.3, kl_penalty="loss", kl_coef=0.5,
                  rewards=[]),
        # sequence_mean: each row's token mean, then the mean over rows.
        PpoConfig(max_completion_length=LC, vf_coef=0.0, loss_aggregation="sequence_mean",
                  rewards=[]),
    ]
    # The three losses in one compiled program (PpoConfig holds a list: it cannot be static).
    outs = nnx.jit(lambda model, batch, ctx: [ppo_loss(model, batch, ctx, cfg=cfg)
                                              for cfg in configs])(actor_critic, batch, ctx)
    out = outs[0]
    expected = (-(advantages * mask).sum() + 0.3 * 0.5 * n) / n
    np.testing.assert_allclose(float(out.numerator / out.denominator), expected, rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics["value_loss"] / out.denominator), 0.5, rtol=1e-5)
    assert float(out.denominator) == n
    k3 = np.exp(-0.1) + 0.1 - 1
    out = outs[1]
    np.testing.assert_allclose(
        float(out.numerator / out.denominator), expected + 0.5 * k3, rtol=1e-5
    )
    out = outs[2]
    per_row = -(advantages * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(float(out.numerator / out.denominator), per_row.mean(), rtol=1e-5)


@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
def test_finisher_puts_the_kl_penalty_in_the_reward_only_when_asked(
    actor_critic, rollout_batch, kl_penalty
):
    batch = dict(rollout_batch, scores=np.array([1.0, -0.5, 2.0, 0.25], np.float32))
    ref_model = init_model(TINY, seed=7)  # another model: the KL is far from 0
    ref_params = nnx.state(ref_model, nnx.Param)
    cfg = PpoConfig(max_completion_length=LC, gamma=1.0, lam=1.0, whiten_advantages=False,
                    kl_penalty=kl_penalty, kl_estimator="k1", rewards=[])
    arrays, metrics = finish_arrays(actor_critic, ref_params, batch, jnp.float32(0.3), cfg=cfg)
    mask = _window(batch, "completion_mask")
    logits = ref_model(batch["input_ids"], batch["positions"], batch["segment_ids"])
    ref_logp = _window({**batch, "r": np.asarray(token_logprobs(
        logits, jnp.asarray(batch["target_ids"])))}, "r") * mask
    np.testing.assert_allclose(arrays["ref_logprobs"], ref_logp, atol=1e-5)
    kl = (_window(batch, "old_logprobs") - ref_logp) * mask
    # gamma = lam = 1: the return at t is the sum of the rewards from t to the row's end.
    penalty = 0.3 * kl if kl_penalty == "reward" else 0.0 * kl
    rewards = -penalty
    last = mask.sum(1).astype(int) - 1
    rewards[np.arange(4), last] += batch["scores"]
    returns = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose(arrays["returns"], returns, atol=1e-5)
    np.testing.assert_allclose(arrays["advantages"], (returns - arrays["old_values"]) * mask,
                               atol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl.sum(1).mean(), rtol=1e-4)
    expected_non_score = -(0.3 if kl_penalty == "reward" else 0.0) * kl.sum(1).mean()
    np.testing.assert_allclose(float(metrics["non_score_reward"]), expected_non_score,
                               rtol=1e-4, atol=1e-7)


def test_minibatch_epochs_visit_every_row_once_keeping_groups_together():
    epochs = []
    for epoch in range(3):
        parts = [minibatch_rows(24, 3, 4, epoch * 4 + i, seed=(0, 5)) for i in range(4)]
        rows = np.concatenate(parts)
        assert sorted(rows.tolist()) == list(range(24))
        for part in parts:
            assert len(part) == 6
            groups = part.reshape(-1, 3)
            assert (groups == groups[:, :1] + np.arange(3)).all() and (groups[:, 0] % 3 == 0).all()
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    np.testing.assert_array_equal(minibatch_rows(24, 3, 4, 5, seed=(0, 5)),
                                  minibatch_rows(24, 3, 4, 5, seed=(0, 5)))


def test_critic_learning_rate_scale_applies_only_to_critic_updates(actor_critic):
    params = nnx.state(actor_critic, nnx.Param)
    ctx = types.SimpleNamespace(task_config=PpoConfig(critic_lr_scale=10.0, rewards=[]))
    tx = optax.chain(optax.sgd(1.0), scale_updates(update_scales(ctx, params)))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    policy = jax.tree.leaves(updates["policy"])
    critic = jax.tree.leaves(updates["critic"])
    assert all(np.all(np.asarray(u) == -1.0) for u in policy)
    assert all(np.all(np.asarray(u) == -10.0) for u in critic)


@pytest.mark.parametrize("changes, key", [
    ({"kl_controller": "adaptive", "kl_penalty": "loss"}, "ppo.kl_controller"),
    ({"critic": "shared", "critic_model": "some/dir"}, "ppo.critic_model"),
    ({"kl_estimator": "k2"}, "ppo.kl_estimator"),
    ({"num_mini_batches": 0}, "ppo.num_mini_batches"),
    ({"lam": 1.5}, "ppo.gamma"),
])
def test_bad_ppo_settings_name_their_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        PpoConfig(**changes)


def overrides(output_dir, model_path, prompts, **extra):
    values = {
        "output_dir": output_dir, "model.path": model_path, "data.train": prompts,
        "data.eval": "null", "train.batch_size": 8, "train.log_every": 1,
        "ppo.max_prompt_length": 16, "ppo.max_completion_length": 8,
        "ppo.rewards": "[{fn: 'test_grpo:digit_fraction'}]", "ppo.eval_prompts": 0,
        "ppo.log_completions": 1, "logging.progress": "false", "logging.tensorboard": "false",
        "export.hf": "false", "checkpoint.every": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_empty_rewards_without_a_reward_model_is_a_config_error(tmp_path, tiny_dir, prompts_file):
    with pytest.raises(ConfigError, match="ppo.rewards"):
        load_config(PPO_ARITH, overrides(str(tmp_path), tiny_dir, prompts_file,
                                         **{"ppo.rewards": "[]"}))


def test_reward_rises_on_a_toy_task_with_a_shared_critic(tmp_path, tiny_dir, prompts_file):
    out = str(tmp_path / "toy")
    run(load_config(PPO_ARITH, overrides(out, tiny_dir, prompts_file, **{
        "train.max_steps": 16, "optim.lr": 3e-2, "ppo.critic": "shared",
        "ppo.num_ppo_epochs": 1, "ppo.samples_per_prompt": 4, "ppo.kl_coef": 0.0,
        "ppo.critic_lr_scale": 1.0,  # the shared head and backbone take the policy's lr
    })))
    rewards = [r["reward"] for r in train_rows(out) if "reward" in r]
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert last > first + 0.1, rewards


def test_resume_is_exact_mid_rollout_with_a_reward_model_and_the_adaptive_controller(
    tmp_path, tiny_dir, prompts_file
):
    rm_dir = str(tmp_path / "rm")
    save_classifier(init_classifier(TINY, seed=3), rm_dir)
    extra = {"train.max_steps": 6, "ppo.num_mini_batches": 2, "ppo.num_ppo_epochs": 2,
             "ppo.reward_model": rm_dir, "ppo.reward_model_weight": 0.5,
             "ppo.kl_controller": "adaptive", "ppo.kl_target": 0.01, "ppo.kl_horizon": 100,
             "ppo.samples_per_prompt": 2, "optim.lr": 1e-2, "ppo.critic_lr_scale": 3.0,
             # the trainer's own log-probs as the old policy, masked importance weights
             "rl.importance_correction": "mis"}
    full = str(tmp_path / "full")
    run(load_config(PPO_ARITH, overrides(full, tiny_dir, prompts_file, **extra,
                                         **{"export.hf": "true"})))
    resumed = str(tmp_path / "resumed")
    config = load_config(PPO_ARITH, overrides(resumed, tiny_dir, prompts_file, **extra))
    first = run(config, stop_after_step=3)  # inside the first 4-step rollout
    assert first.preempted and first.step == 3
    run(config)
    a, b = train_rows(full), train_rows(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "value_loss", "policy_loss", "grad_norm", "clipfrac", "mismatch_kl",
                "is_weight"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert abs(a[0]["is_weight"] - 1) < 1e-4  # sampler and trainer: the same policy
    rollouts = [r for r in a if "kl_coef" in r]
    assert [r["step"] for r in rollouts] == [1, 5]
    for key in ("kl", "kl_coef", "reward", "explained_variance"):
        assert [r[key] for r in rollouts] == [r[key] for r in b if "kl_coef" in r], key
    # The controller moved the coefficient between the rollouts (the KL is not the target).
    assert rollouts[1]["kl_coef"] != rollouts[0]["kl_coef"]
    with open(os.path.join(full, "completions.jsonl")) as f:
        sample = json.loads(f.readline())
    assert set(sample["rewards"]) == {"digit_fraction", "reward_model"}
    with open(os.path.join(full, "hf", "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]  # the policy alone
