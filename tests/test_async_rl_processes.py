"""Asynchronous GRPO across 2 processes (gloo, 1 CPU device each): process 0 trains,
process 1 samples (``jaxpt.rollout_worker``), the weights and the rollouts cross between them
by JAX collectives (``jaxpt.tasks.rl.remote``, ``PeerLink``). The run follows the fixed
schedule, its rollouts sample with weights that came from the trainer, and it trains
exactly like the same split run in one process."""

import json
import os
import sys
import types

import numpy as np
import pytest
from tiny import free_port, one_device_env, start_processes, train_rows, wait_processes

from jaxpt.checkpoint import fingerprint
from jaxpt.config import ConfigError, load_config
from jaxpt.loop import setup, train
from jaxpt.tasks.rl.placement import process_sides

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
GRPO_ARITH = os.path.join(ROOT, "configs", "grpo_arith.yaml")
WORKER = os.path.join(TESTS, "multihost_worker.py")  # runs jaxpt.cli.train.main
TIMEOUT_S = 300
STEPS = 3


def spread_reward(prompts, completions, **kwargs):
    """Rewards that differ within a group, so the advantages are not all zero."""
    return [float(len(set(text)) % 3) for text in completions]


def _overrides(output_dir, model, prompts, **extra) -> list[str]:
    values = {
        "output_dir": output_dir, "model.path": model, "data.train": prompts,
        "data.eval": "null", "train.batch_size": 8, "train.max_steps": STEPS,
        "train.log_every": 1, "grpo.num_generations": 4, "grpo.max_prompt_length": 16,
        "grpo.max_completion_length": 8,
        "grpo.rewards": "[{fn: 'test_async_rl_processes:spread_reward'}]",
        "grpo.log_completions": 1, "grpo.eval_prompts": 0, "optim.lr": 3e-3,
        "logging.progress": "false", "logging.tensorboard": "false",
        "checkpoint.every": 2, "checkpoint.async_save": "false", "mesh.fsdp": 1,
        "rl.max_staleness": 1, "rl.train_devices": 1, "rl.rollout_devices": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _launch(overrides: list[str], tmp_path) -> list[str]:
    """``python -m jaxpt.train`` (through the multi-host worker) on 2 processes of one CPU
    device each; their logs, once both exited with 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXPT_", "XLA_"))}
    env["XLA_FLAGS"] = one_device_env()["XLA_FLAGS"]  # the suite's compile settings
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")])
    env.update(JAXPT_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAXPT_NUM_PROCESSES="2")
    cache = os.path.join(os.environ.get("JAX_COMPILATION_CACHE_DIR", str(tmp_path)),
                         "async-processes")
    jobs = json.dumps([[GRPO_ARITH, overrides]])
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    started = start_processes([sys.executable, WORKER, "1", jobs, cache], env, logs, ROOT)
    texts = wait_processes(started, logs, TIMEOUT_S, "the asynchronous run", tail=5000)
    return texts


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir, prompts_file):
    """The same asynchronous split run on 2 processes and in this one (train device 0,
    rollout device 1 of the suite's 8), with the fingerprint of its initial weights."""
    tmp = tmp_path_factory.mktemp("async_processes")
    two = tmp / "two"
    logs = _launch(_overrides(str(two), tiny_dir, prompts_file), tmp)
    one = tmp / "one"
    # Device ids (not counts) as tests/test_async_rl.py gives them: its compiled programs
    # are in the suite's cache.
    config = load_config(GRPO_ARITH, _overrides(str(one), tiny_dir, prompts_file, **{
        "export.hf": "false", "rl.train_devices": "[0]", "rl.rollout_devices": "[1]"}))
    with setup(config) as run:
        initial = fingerprint(run.state.params)
        train(run)
    return types.SimpleNamespace(two=two, one=one, logs=logs, initial=initial)


@pytest.mark.slow
def test_two_processes_train_on_the_fixed_schedule(runs):
    rows = train_rows(str(runs.two))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["staleness"] for r in rows] == [0.0] + [1.0] * (STEPS - 1)
    assert [r["policy_version"] for r in rows] == [float(s) for s in range(STEPS)]
    assert all(r["weight_sync/bytes"] > 0 for r in rows)
    # 22,688 float32 weights of the tiny model cross every version.
    assert rows[0]["weight_sync/bytes"] == 4 * 22688
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)
    assert all(r["time/trainer_wait_s"] >= 0 for r in rows)
    # Process 0 logged the completions, checkpointed (alone) and exported.
    with open(runs.two / "completions.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, STEPS + 1))
    assert sorted(os.listdir(runs.two / "checkpoints")) == ["2", "3"]
    assert os.path.exists(runs.two / "hf" / "model.safetensors")
    assert f"finished at step {STEPS}" in runs.logs[0]
    assert f"sent {STEPS} rollouts" in runs.logs[1]


@pytest.mark.slow
def test_the_sampler_got_its_weights_from_the_trainer(runs):
    """The rollout process never reads the model's weights: version 0, with which it sampled
    rollouts 0 and 1, is bit for bit the trainer's initial params, and version 1 (after an
    update) differs."""
    with open(runs.two / "rollouts.jsonl") as f:
        record = [json.loads(line) for line in f]
    assert [r["rollout"] for r in record] == list(range(STEPS))
    assert [r["version"] for r in record] == [0] + list(range(STEPS - 1))
    assert record[0]["weights"] == record[1]["weights"] == runs.initial
    assert record[2]["weights"] != runs.initial


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    """Same seed, same schedule: the 2-process run's rewards and losses are the 1-process
    split run's."""
    two, one = train_rows(str(runs.two)), train_rows(str(runs.one))
    for key in ("reward", "loss", "grad_norm", "completion_length/mean", "staleness"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one],
                                   rtol=1e-6, atol=1e-7, err_msg=key)


def test_each_process_is_on_one_side(tmp_path, tiny_dir, prompts_file):
    def sides(train, rollout):
        config = load_config(GRPO_ARITH, _overrides(
            str(tmp_path), tiny_dir, prompts_file,
            **{"rl.train_devices": train, "rl.rollout_devices": rollout}))
        # 2 processes of 2 devices each
        devices = [types.SimpleNamespace(id=i, process_index=i // 2) for i in range(4)]
        return process_sides(config, devices)

    assert sides("[0, 1]", "[2, 3]") == ({0}, {1})
    with pytest.raises(ConfigError, match="processes \\[0\\] devices of both sides"):
        sides("[0]", "[1]")
    with pytest.raises(ConfigError, match="'rl.train_devices' must include process 0"):
        sides("[2, 3]", "[0, 1]")
    config = load_config(os.path.join(ROOT, "configs", "ppo_arith.yaml"), [
        f"output_dir={tmp_path}", f"model.path={tiny_dir}", "rl.train_devices=[0, 1]"])
    with pytest.raises(ConfigError, match="the grpo task supports, not 'ppo'"):
        process_sides(config, [types.SimpleNamespace(id=i, process_index=i // 2)
                               for i in range(4)])
