"""Multi-turn episodes: the token layout of episodes whose environment answers with tool
results and user turns (the policy's tokens exactly as sampled, with their log-probs; the
environment's rendered by the chat template and masked), the rewards, GAE over the masked
turns, a GRPO run over episodes with its metrics and transcripts, and an exact resume after
a crash in the middle of an episode."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import train_rows

from jaxpt.config import load_config
from jaxpt.data import load_tokenizer
from jaxpt.envs import Environment, EnvStep
from jaxpt.loop import run
from jaxpt.losses import token_logprobs
from jaxpt.losses.ppo import gae_advantages
from jaxpt.models import load_model
from jaxpt.rewards.runner import RewardRunner
from jaxpt.sampling import SamplingConfig
from jaxpt.tasks.rl.batch import train_batch
from jaxpt.tasks.rl.episodes import Episode, EpisodeLimits, EpisodeRunner, episodes_rollout

pytestmark = pytest.mark.usefixtures("one_device_runs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO_ARITH = os.path.join(ROOT, "configs", "grpo_arith.yaml")
# What the shipped ChatML template writes after an assistant turn's <|im_end|>, then a tool
# result or a user turn, then the next assistant header.
TOOL_TURN = "\n<|im_start|>tool\n{}<|im_end|>\n<|im_start|>assistant\n"
USER_TURN = "\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


class ScriptedEnv(Environment):
    """Answers turn 1 with a tool result, turn 2 with a user message, ends after turn 3;
    rewards 0.25, 0.5 and 1.0. ``crash_at`` (a count of steps over all instances) raises
    ``Crash`` there, as a killed process would stop."""

    steps = 0
    crash_at = None

    def reset(self, row, seed):
        self.turn, self.seed = 0, seed
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, turn):
        ScriptedEnv.steps += 1
        if ScriptedEnv.crash_at is not None and ScriptedEnv.steps >= ScriptedEnv.crash_at:
            raise Crash
        self.turn += 1
        if self.turn == 1:
            return EnvStep([{"role": "tool", "name": "lookup", "content": f"seed{self.seed % 7}"}],
                           reward=0.25)
        if self.turn == 2:
            return EnvStep([{"role": "user", "content": "and then?"}], reward=0.5)
        return EnvStep(reward=1.0, done=True)


class Crash(BaseException):
    pass


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return load_model(tiny_dir, dtype="float32", param_dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


def _runner(tokenizer, max_turn_tokens=5, max_turns=3, lc=96):
    sampling = SamplingConfig.make(max_new_tokens=lc, temperature=1.0, eos_token_id=3)
    return EpisodeRunner(tokenizer, ScriptedEnv, sampling=sampling, max_prompt_length=24,
                         max_completion_length=lc,
                         limits=EpisodeLimits(max_turns=max_turns, max_turn_tokens=max_turn_tokens))


def test_episode_tokens_masks_logprobs_and_rewards(policy, tokenizer):
    """Three turns per episode: each policy turn is what the engine sampled (ended by
    <|im_end|>, or cut at 5 tokens and closed with an unsampled <|im_end|>), followed by
    exactly the template's rendering of the environment's message; the mask is 1 on the
    sampled tokens alone; their log-probs equal a teacher-forced forward over the whole
    episode (the resumed decode read the right pages); the rewards sum per turn."""
    from flax import nnx

    runner = _runner(tokenizer)
    rows = [{"prompt": "What is 2+2?"}, {"prompt": "Name a prime."}] * 2
    episodes = runner.run(nnx.split(policy), rows, [11, 12, 13, 14], jax.random.key(0))
    for episode in episodes:
        assert episode.end == "done" and episode.turns == 3
        assert episode.turn_rewards == [0.25, 0.5, 1.0] and episode.reward == 1.75
        turns = [t for t in episode.transcript if t["role"] == "assistant"]
        # Rebuild the layout by hand: policy span, closing token, environment span.
        expected, mask, at = [], [], 0
        envs = [TOOL_TURN.format(f"seed{episode.seed % 7}"), USER_TURN.format("and then?")]
        for k, turn in enumerate(turns):
            start, end = turn["tokens"]
            assert start == at
            sampled = episode.tokens[start:end]
            assert sampled[-1] == 3  # every turn ends with <|im_end|>, sampled or not
            closed = len(sampled) == 6  # 5 sampled, none of them <|im_end|>: closed for it
            policy_len = len(sampled) - closed
            assert 3 not in sampled[: policy_len - 1]
            expected += sampled
            mask += [1] * policy_len + [0] * closed
            if k < 2:
                ids = tokenizer.encode(envs[k], add_special_tokens=False)
                expected += ids
                mask += [0] * len(ids)
            at = len(expected)
        assert episode.tokens == expected and episode.policy_mask == mask
        # Teacher-forced log-probs of the sampled tokens (temperature 1).
        ids = np.array(episode.prompt_ids + episode.tokens, np.int32)[None]
        logits = policy(jnp.asarray(ids), positions=jnp.arange(ids.shape[1])[None],
                        segment_ids=jnp.ones_like(jnp.asarray(ids)))
        forced = np.asarray(token_logprobs(logits[:, :-1], jnp.asarray(ids[:, 1:])))[0]
        forced = forced[len(episode.prompt_ids) - 1 :]
        policy_at = np.flatnonzero(np.array(mask))
        np.testing.assert_allclose(np.array(episode.logprobs)[policy_at], forced[policy_at],
                                   atol=1e-4)
        assert not np.array(episode.logprobs)[np.array(mask) == 0].any()


def test_train_rows_and_gae_pass_over_the_environments_tokens():
    """An episode laid out by hand: policy tokens [5, 6] (log-probs -1, -2), a tool result
    [7, 8, 9], policy tokens [10, 3]. The train row's completion mask covers the four policy
    targets only, the old log-probs sit on them, the environment's reward joins the reward
    functions' total, and PPO's GAE (gamma 1, lambda 0.5) skips the tool tokens: the
    value after the first policy span is the next policy token's, by hand."""
    episode = Episode(row={"prompt": "q"}, seed=0, prompt_ids=[1, 2], tokens=[5, 6, 7, 8, 9, 10, 3],
                      policy_mask=[1, 1, 0, 0, 0, 1, 1],
                      logprobs=[-1.0, -2.0, 0.0, 0.0, 0.0, -3.0, -4.0],
                      turn_rewards=[0.0, 0.5], end="done")
    scored = RewardRunner([("const", lambda prompts, completions, **_: [1.0])])
    rewards = scored(["q"], ["x"])
    rollout = episodes_rollout([episode], [{"prompt": "q"}], 1, rewards, max_prompt_length=3,
                               max_completion_length=8)
    assert rollout.rewards.total.tolist() == [1.5]
    assert rollout.rewards.scores["env"].tolist() == [0.5]
    batch = train_batch(rollout, np.array([2.0], np.float32), np.ones(1, bool))
    lp = 3  # prompt width; target t predicts input t + 1
    window = slice(lp - 1, lp - 1 + 8)
    assert batch["completion_mask"][0, window].tolist() == [1, 1, 0, 0, 0, 1, 1, 0]
    assert batch["old_logprobs"][0, window].tolist() == [-1, -2, 0, 0, 0, -3, -4, 0]
    assert batch["input_ids"][0].tolist() == [0, 1, 2, 5, 6, 7, 8, 9, 10, 3, 0]

    mask = batch["completion_mask"][:, window]
    values = np.array([[0.1, 0.2, 9.0, 9.0, 9.0, 0.3, 0.4, 9.0]], np.float32)
    token_rewards = np.zeros((1, 8), np.float32)
    token_rewards[0, 6] = 1.5  # the score on the last policy token
    advantages, returns = gae_advantages(jnp.asarray(token_rewards), jnp.asarray(values),
                                         jnp.asarray(mask), 1.0, 0.5)
    # Backwards over the policy positions 6, 5, 1, 0 (2-4 are the tool's).
    a6 = 1.5 - 0.4
    a5 = (0 + 0.4 - 0.3) + 0.5 * a6
    a1 = (0 + 0.3 - 0.2) + 0.5 * a5
    a0 = (0 + 0.2 - 0.1) + 0.5 * a1
    np.testing.assert_allclose(np.asarray(advantages)[0], [a0, a1, 0, 0, 0, a5, a6, 0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(returns)[0, [0, 1, 5, 6]],
                               [a0 + 0.1, a1 + 0.2, a5 + 0.3, a6 + 0.4], atol=1e-6)


def _overrides(output_dir, model_path, prompts, **extra):
    values = {
        "output_dir": output_dir, "model.path": model_path, "data.train": prompts,
        "data.eval": "null", "train.batch_size": 4, "train.log_every": 1,
        "grpo.num_generations": 2, "grpo.max_prompt_length": 24,
        "grpo.max_completion_length": 96, "grpo.rewards": "[]", "grpo.log_completions": 1,
        "optim.lr": 3e-3, "logging.progress": "false", "logging.tensorboard": "false",
        "export.hf": "false", "checkpoint.every": 2, "checkpoint.async_save": "false",
        "envs.spec": "test_episodes:ScriptedEnv", "envs.max_turn_tokens": 4,
        "envs.max_turns": 3, "train.max_steps": 4,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_grpo_on_episodes_logs_them_and_resumes_exactly_after_a_crash_mid_episode(
    tmp_path, tiny_dir, prompts_file
):
    """GRPO over scripted 3-turn episodes: the metrics count turns and the environment's
    reward, completions.jsonl shows each episode's turns. A second run crashes inside an
    episode of step 3's rollout (after the step-2 checkpoint); resumed, its steps 3-4 equal
    the uninterrupted run's exactly."""
    full = str(tmp_path / "full")
    run(load_config(GRPO_ARITH, _overrides(full, tiny_dir, prompts_file)))
    a = train_rows(full)
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    assert all(r["episode/turns"] == 3.0 and r["reward"] == 1.75 for r in a)
    assert all(r["episode/end/done"] == 1.0 for r in a)
    with open(os.path.join(full, "completions.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    roles = [t["role"] for t in logged[0]["episode"]]
    assert roles == ["assistant", "tool", "assistant", "user", "assistant"]

    crashed = str(tmp_path / "crashed")
    config = load_config(GRPO_ARITH, _overrides(crashed, tiny_dir, prompts_file))
    ScriptedEnv.steps, ScriptedEnv.crash_at = 0, 2 * 4 * 3 + 5  # inside rollout 3
    try:
        with pytest.raises(Crash):
            run(config)
    finally:
        ScriptedEnv.crash_at = None
    assert [r["step"] for r in train_rows(crashed)] == [1, 2]
    run(config)
    b = train_rows(crashed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "reward", "episode/length", "episode/policy_tokens"):
        assert [r[key] for r in a] == [r[key] for r in b], key


@pytest.mark.parametrize(("key", "value", "message"), [
    ("envs.spec", "nowhere.mod:Env", "cannot be imported"),
    ("envs.tools", "[no_such_tool]", "unknown tool 'no_such_tool'"),
    ("envs.kwargs", "{colour: red}", "do not fit"),
    ("envs.parser", "smoke_signals", "envs.parser"),
    ("envs.max_turns", "0", "envs.max_turns"),
])
def test_bad_envs_settings_fail_at_load_naming_the_key(key, value, message, tiny_dir,
                                                         prompts_file, tmp_path):
    from jaxpt.config import ConfigError
    from jaxpt.tasks import get_task

    extra = {"envs.spec": "tools", "envs.tools": "[calculator]", key: value}
    with pytest.raises(ConfigError, match=message):
        config = load_config(GRPO_ARITH, _overrides(str(tmp_path), tiny_dir, prompts_file,
                                                    **extra))
        get_task("grpo").check_config(config)
