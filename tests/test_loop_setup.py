"""The loop's two phases: ``setup`` (config -> Run) and ``train`` (Run -> RunResult); a Run
stepped by hand (as benchmarks and test helpers do) is the loop's own step."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from preference_helpers import train_steps
from tiny import QWEN3_MOE_TINY, SFT_TINY, make_tiny_dir, sft_overrides

from jaxpt.config import ConfigError, load_config
from jaxpt.loop import setup, train


def sft_config(output_dir, tiny_dir, **extra):
    return load_config(SFT_TINY, sft_overrides(output_dir, tiny_dir, **{
        "train.log_every": 1, "train.max_steps": 3, "data.eval": "arithmetic",
        "train.eval_batches": 1, "data.arithmetic.num_test": 8, "export.hf": "false",
        "checkpoint.every": 0, **extra,
    }))


def test_setup_checks_the_batch_against_the_mesh(tmp_path, mesh8):
    config = sft_config(str(tmp_path), "jaxpt-tiny", **{"train.batch_size": 6})
    with pytest.raises(ConfigError, match=r"train\.batch_size' \(6\).*batch shards \(4\)"):
        setup(config, mesh=mesh8)


def test_a_run_stepped_by_hand_is_the_loops_step(tmp_path, tiny_dir, mesh1):
    config = sft_config(str(tmp_path / "loop"), tiny_dir)
    with setup(config, mesh=mesh1) as run:
        assert run.mesh is mesh1
        leaf = jax.tree.leaves(run.state.params)[0]
        assert leaf.sharding.mesh.devices.size == 1
        result = train(run)
        params = jax.device_get(run.state.params)
    assert result.step == 3 and result.evals[-1]["step"] == 3
    with open(os.path.join(config.output_dir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]

    by_hand = sft_config(str(tmp_path / "by_hand"), tiny_dir)
    state, history, evaluation = train_steps(by_hand, mesh1, 3)
    for key in ("loss", "grad_norm", "lr", "tokens", "nonfinite_steps"):
        assert [r[key] for r in rows] == [h[key] for h in history], key
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert evaluation == {k: v for k, v in result.evals[-1].items() if k != "step"}


# Tiny runs of every task that plans and benchmarks cover, each with its optimizer wrappers
# and reference: GRPO's KL term and PPO keep a reference, LoRA keeps none and trains only
# the adapters, PPO scales the critic's updates.
RUN_SHAPES = {
    "sft": {},
    "grpo": {"task": "grpo", "grpo.beta": 0.1},
    "grpo_lora": {"task": "grpo", "grpo.beta": 0.1, "lora.rank": 4},
    "dpo": {"task": "dpo", "dpo.precompute_ref": "false"},
    "kto": {"task": "kto"},
    # The teacher is another model: kept under LoRA too.
    "distill_lora": {"task": "distill", "lora.rank": 4, "distill.max_prompt_length": 16,
                     "distill.max_completion_length": 8, "distill.eval_prompts": 0},
    "online_dpo": {"task": "online_dpo", "online_dpo.rewards": "[{name: math}]",
                   "online_dpo.max_prompt_length": 16, "online_dpo.max_completion_length": 8,
                   "online_dpo.eval_prompts": 0, "data.eval": "null"},
    "rm": {"task": "rm"},
    "prm": {"task": "prm"},
    "ppo": {"task": "ppo", "ppo.rewards": "[{name: math}]", "ppo.critic_lr_scale": 2.0},
}
RL = {"eval_prompts": 0, "num_generations": 2, "samples_per_prompt": 2,
      "max_prompt_length": 16, "max_completion_length": 8}


def run_config(output_dir, tiny_dir, name):
    extra = dict(RUN_SHAPES[name])
    task = extra.get("task", "sft")
    if task == "distill":
        extra.update({"distill.teacher": tiny_dir, "data.eval": "null"})
    if task in ("grpo", "ppo"):
        keys = {k: v for k, v in RL.items() if k != ("num_generations" if task == "ppo"
                                                     else "samples_per_prompt")}
        extra.update({f"{task}.{k}": v for k, v in keys.items()})
        extra["data.eval"] = "null"
    return sft_config(output_dir, tiny_dir, **extra)


def layout(tree) -> dict:
    """Each leaf's (shape, dtype, sharding) by its path."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): (x.shape, x.dtype, x.sharding) for p, x in flat}


@pytest.mark.parametrize("name", sorted(RUN_SHAPES))
def test_the_described_run_is_the_one_setup_creates(tmp_path, tiny_dir, mesh1, name):
    """``jaxpt.run_spec.abstract_run`` (what plans and the memory benchmark compile) has
    the state ``setup`` allocates, leaf for leaf, and the batch its source makes."""
    from jaxpt.run_spec import abstract_run
    from jaxpt.sharding import use_rules
    from jaxpt.step import NonFiniteCounts
    from jaxpt.tasks.common import keeps_reference

    config = run_config(str(tmp_path), tiny_dir, name)
    with setup(config, mesh=mesh1) as run:
        with use_rules(run.ctx.rules):
            described = abstract_run(config, mesh1, run.ctx.rules, hf_config=None)
        state = run.state
        assert isinstance(state.opt_state, NonFiniteCounts)
        assert (state.ref_params is not None) == keeps_reference(config)
        assert keeps_reference(config) == (
            name in ("grpo", "dpo", "kto", "ppo", "distill_lora", "online_dpo"))
        for field in ("params", "rest", "opt_state", "step", "rng", "ref_params"):
            concrete, abstract = getattr(state, field), getattr(described.state, field)
            assert jax.tree.structure(concrete) == jax.tree.structure(abstract), field
            assert layout(concrete) == layout(abstract), field
        if config.task in ("sft", "dpo", "kto", "rm", "prm"):
            batch, _ = run.source.next(state)
            assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
                k: (v.shape, v.dtype) for k, v in described.batch.items()}
        else:  # no rollout here: the loop's step traces on the described batch instead
            described.jit_step().lower(described.state, described.batch)


def test_the_described_run_shards_like_setup_on_eight_devices(tmp_path, tiny_dir, mesh8):
    from jaxpt.run_spec import abstract_run
    from jaxpt.sharding import use_rules

    config = run_config(str(tmp_path), tiny_dir, "grpo")
    with setup(config, mesh=mesh8) as run:
        with use_rules(run.ctx.rules):
            described = abstract_run(config, mesh8, run.ctx.rules)
        assert layout(run.state) == layout(described.state)
        assert any(not s.is_fully_replicated for _, _, s in layout(run.state).values())


# ------------------------------------------------------------- a mixture-of-experts model


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return make_tiny_dir(str(tmp_path_factory.mktemp("tiny_moe")), config=QWEN3_MOE_TINY)


@pytest.mark.parametrize("task", ["sft", "dpo", "grpo"])
def test_train_steps_log_router_losses(moe_dir, tmp_path, mesh1, task):
    """A few SFT steps, a DPO and a GRPO step of a tiny Qwen3-MoE: the router losses are in
    the loss and every router metric is logged."""
    config = run_config(str(tmp_path), moe_dir, task)
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, moe_aux_loss_weight=0.01, moe_z_loss_weight=0.001))
    _, history, _ = train_steps(config, mesh1, 2 if task == "sft" else 1)
    if task == "dpo":  # the policy's router losses ride on the preference loss
        assert {"rewards/margins", "rewards/accuracy"} <= set(history[0])
    for row in history:
        assert np.isfinite(row["loss"]) and row["grad_norm"] > 0
        assert 1.0 <= row["moe_aux_loss"] < 4.0  # 1 when balanced, E=4 at worst
        assert row["moe_z_loss"] > 0
        assert {"moe_aux_loss/layer_0", "moe_aux_loss/layer_1"} <= set(row)
        assert sum(row[f"moe_tokens_per_expert/{e}"] for e in range(4)) > 0
