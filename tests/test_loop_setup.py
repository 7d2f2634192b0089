"""The loop's two phases: ``setup`` (config -> Run) and ``train`` (Run -> RunResult); a Run
stepped by hand (as benchmarks and test helpers do) is the loop's own step."""

import json
import os

import jax
import numpy as np
import pytest
from preference_helpers import train_steps
from tiny import SFT_TINY, sft_overrides

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
