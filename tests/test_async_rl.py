"""Asynchronous RL (``rl.max_staleness``, ``rl.train_devices`` / ``rl.rollout_devices``): the
fixed schedule's lags, importance weights of an off-policy batch against a hand computation,
exact resume mid-queue, and placement errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import train_rows

from jaxpt.config import ConfigError, load_config
from jaxpt.loop import run, setup
from jaxpt.losses import importance_weights
from jaxpt.tasks import grpo
from jaxpt.tasks.rl.batch import completion_window
from jaxpt.tasks.rl.placement import rollout_mesh, split_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO_ARITH = os.path.join(ROOT, "configs", "grpo_arith.yaml")
LC = 8
# One train device and one rollout device (the 8 emulated CPU devices' first two).
SPLIT = {"rl.train_devices": "[0]", "rl.rollout_devices": "[1]"}


def spread_reward(prompts, completions, **kwargs):
    """Rewards that differ within a group, so the advantages are not all zero."""
    return [float(len(set(text)) % 3) for text in completions]


def overrides(output_dir, model_path, prompts, **extra):
    values = {
        "output_dir": output_dir, "model.path": model_path, "data.train": prompts,
        "data.eval": "null", "train.batch_size": 8, "train.log_every": 1,
        "grpo.num_generations": 4, "grpo.max_prompt_length": 16,
        "grpo.max_completion_length": LC, "grpo.rewards": "[{fn: 'test_async_rl:spread_reward'}]",
        "grpo.log_completions": 1, "grpo.eval_prompts": 0, "optim.lr": 3e-3,
        "logging.progress": "false", "logging.tensorboard": "false", "export.hf": "false",
        "checkpoint.every": 2, "mesh.fsdp": 1, "rl.max_staleness": 1, **SPLIT,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_split_devices_and_errors(tiny_dir, prompts_file, tmp_path):
    def config(**extra):
        return load_config(GRPO_ARITH, overrides(str(tmp_path), tiny_dir, prompts_file, **extra))

    devices = jax.devices()
    train, rollout = split_devices(config(), devices)
    assert [d.id for d in train] == [0] and [d.id for d in rollout] == [1]
    # Counts: the first devices train, the last sample; one side alone takes the rest.
    train, rollout = split_devices(
        config(**{"rl.train_devices": 6, "rl.rollout_devices": "null"}), devices)
    assert [d.id for d in train] == list(range(6)) and [d.id for d in rollout] == [6, 7]
    mesh = rollout_mesh(config(**{"rl.train_devices": "null", "rl.rollout_devices": 4,
                                  "rl.rollout_mesh": "{tensor: 2}"}), devices)
    assert dict(mesh.shape)["data"] == 2 and dict(mesh.shape)["tensor"] == 2
    assert split_devices(config(**{"rl.train_devices": "null", "rl.rollout_devices": "null"}),
                         devices) is None
    with pytest.raises(ConfigError, match="share devices"):
        split_devices(config(**{"rl.rollout_devices": "[0, 1]"}), devices)
    with pytest.raises(ConfigError, match="'rl.rollout_devices'.*between 1 and 7"):
        split_devices(config(**{"rl.train_devices": "null", "rl.rollout_devices": 8}), devices)
    with pytest.raises(ConfigError, match="'rl.train_devices' names devices \\[9\\]"):
        split_devices(config(**{"rl.train_devices": "[9]"}), devices)
    with pytest.raises(ConfigError, match="'rl.max_staleness' must be >= 0"):
        config(**{"rl.max_staleness": -1})


def test_each_batch_lags_by_the_fixed_schedule_and_resume_mid_queue_is_exact(
    tmp_path, tiny_dir, prompts_file
):
    # k = 2: rollout i is sampled with the weights after max(0, i - 2) rollouts trained.
    # LoRA: after the first move (base and adapters) only the adapters move.
    extra = {"train.max_steps": 5, "rl.max_staleness": 2, "lora.rank": 4}
    full = str(tmp_path / "full")
    run(load_config(GRPO_ARITH, overrides(full, tiny_dir, prompts_file, **extra)))
    a = train_rows(full)
    assert [r["staleness"] for r in a] == [0, 1, 2, 2, 2]
    assert [r["policy_version"] for r in a] == [0, 1, 2, 3, 4]
    # Rank-4 float32 adapters on q, k, v, o (32->32, 32->16, 32->16, 32->32) and gate, up,
    # down (32<->64) of 2 layers: 4 bytes x 4 x (64 + 48 + 48 + 64 + 3 x 96) x 2. The first
    # move also carries the frozen base: 22,688 float32 weights of the tiny model.
    adapters = 4 * 4 * (64 + 48 + 48 + 64 + 3 * 96) * 2
    assert [r["weight_sync/bytes"] for r in a] == [adapters + 4 * 22688] + [adapters] * 4
    # Stopped after step 3 with rollouts 3 and 4 queued (sampled with versions 1 and 2,
    # which a resumed run no longer has): the checkpoint holds them.
    resumed = str(tmp_path / "resumed")
    config = load_config(GRPO_ARITH, overrides(resumed, tiny_dir, prompts_file, **extra))
    first = run(config, stop_after_step=3)
    assert first.preempted and first.step == 3
    run(config)
    b = train_rows(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for key in ("loss", "grad_norm", "reward", "staleness", "completion_length/mean"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def _completion_logprobs(state, batch, cfg):
    return grpo.completion_logprobs(state.model(), batch, cfg, 0)[0]


def test_an_off_policy_batch_carries_both_versions_and_is_weighed_by_their_ratio(
    tmp_path, tiny_dir, prompts_file
):
    """Rollout 1 is sampled with version 0 (the initial weights) and trained with version 1:
    its old log-probs are version 0's, the trainer's are version 1's, and the truncated
    importance weights are min(pi_1 / pi_0, cap) token by token."""
    cap = 1.05  # low enough that some tokens are capped after one large step
    config = load_config(GRPO_ARITH, overrides(
        str(tmp_path), tiny_dir, prompts_file, **{
            "rl.importance_correction": "tis", "rl.importance_cap": cap, "optim.lr": 0.05}))
    with setup(config) as r:
        cfg = r.ctx.task_config
        logprobs = jax.jit(lambda s, b: _completion_logprobs(s, b, cfg))
        state0 = jax.tree.map(jnp.copy, r.state)
        batch0, _ = r.source.next(r.state)
        state1, _ = r.jit_step(batch0)(r.state, r.put_batch(batch0))
        batch1, metrics = r.source.next(state1)
        assert metrics["staleness"] == 1.0 and metrics["policy_version"] == 1.0
        device_batch = r.put_batch(batch1)
        # The train state lives on device 0, the weights that sample on device 1.
        synced = r.source.pipeline.sync.last
        assert {d.id for x in jax.tree.leaves(synced) for d in x.devices()} == {1}
        assert {d.id for x in jax.tree.leaves(state1.params) for d in x.devices()} == {0}
        v0, v1 = logprobs(state0, device_batch), logprobs(state1, device_batch)
    window = completion_window(batch1["input_ids"].shape[1], LC)
    mask = batch1["completion_mask"][:, window] > 0
    sampler = batch1["old_logprobs"][:, window]
    # The sampler's log-probs are version 0's (rounding apart), the trainer's version 1's.
    np.testing.assert_allclose(sampler[mask], np.asarray(v0)[mask], atol=2e-5)
    np.testing.assert_allclose(batch1["trainer_logprobs"][mask], np.asarray(v1)[mask],
                               atol=2e-5)
    moved = np.abs(np.asarray(v1) - np.asarray(v0))[mask]
    assert moved.max() > 0.1  # the update moved the policy: the batch is off-policy
    hand = np.minimum(np.exp(batch1["trainer_logprobs"] - sampler), cap)
    weights, _ = importance_weights(batch1["trainer_logprobs"], sampler, mask, "tis", cap)
    np.testing.assert_allclose(np.asarray(weights)[mask], hand[mask], rtol=1e-6)
    assert (hand[mask] == cap).any() and (hand[mask] < cap).any()


def test_ppo_samples_ahead_while_its_critic_trains_on_the_train_devices(
    tmp_path, tiny_dir, prompts_file
):
    """PPO with a separate critic, 2 minibatches per rollout: the rollouts lag by the
    schedule, and the critic's values and GAE are computed on the train side with the
    weights of the step that trains the rollout."""
    values = {
        "task": "ppo", "output_dir": str(tmp_path), "model.path": tiny_dir,
        "data.train": prompts_file, "data.eval": "null", "train.batch_size": 4,
        "train.max_steps": 6, "train.log_every": 1, "ppo.samples_per_prompt": 1,
        "ppo.num_mini_batches": 2, "ppo.num_ppo_epochs": 1, "ppo.max_prompt_length": 16,
        "ppo.max_completion_length": LC, "ppo.critic": "separate",
        "ppo.rewards": "[{fn: 'test_async_rl:spread_reward'}]", "ppo.eval_prompts": 0,
        "ppo.log_completions": 1, "logging.progress": "false", "logging.tensorboard": "false",
        "export.hf": "false", "checkpoint.every": 0, "mesh.fsdp": 1, "rl.max_staleness": 1,
        **SPLIT,
    }
    config = load_config(os.path.join(ROOT, "configs", "ppo_arith.yaml"),
                         [f"{k}={v}" for k, v in values.items()])
    run(config)
    rows = train_rows(str(tmp_path))
    assert [r["step"] for r in rows] == list(range(1, 7))
    taken = [r for r in rows if "staleness" in r]  # a rollout trains 2 minibatches
    assert [r["step"] for r in taken] == [1, 3, 5]
    assert [r["staleness"] for r in taken] == [0, 1, 1]
    assert all(np.isfinite(r["value_loss"]) for r in rows)


def test_asynchronous_rollouts_are_refused_for_tasks_that_do_not_pipeline(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match="'rl.max_staleness'.*grpo and ppo tasks, not 'sft'"):
        load_config(os.path.join(ROOT, "configs", "sft_tiny.yaml"),
                    [f"output_dir={tmp_path}", f"model.path={tiny_dir}", "rl.max_staleness=1"])
