"""A damaged newest checkpoint: named in a warning, set aside (never deleted), and the run
resumes from the newest intact one; a checkpoint of another run's shapes is not damage."""

import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import SFT_TINY, TINY, sft_overrides, train_rows

from jaxpt.checkpoint import Checkpointer, CheckpointError
from jaxpt.config import load_config
from jaxpt.loop import setup, train
from jaxpt.models import init_model
from jaxpt.state import create_train_state

LR = 3e-3


class Source:
    def __init__(self, position=None):
        self.position = position

    def get_state(self):
        return self.position

    def set_state(self, position):
        self.position = position


def damage(step_dir: str) -> str:
    """Truncate the largest array data file of a checkpoint (as a full disk would)."""
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 10)
    return largest


@pytest.fixture(scope="module")
def state(mesh1):
    with jax.set_mesh(mesh1):
        return create_train_state(init_model(TINY, seed=0, mesh=mesh1), optax.adamw(1e-3), mesh1)


def shifted(state, step):
    """A state told apart by its values: every entry plus ``step``."""
    return jax.tree.map(lambda x: x + np.asarray(step, x.dtype), state)


def saved_steps(tmp_path, state, steps):
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), keep=len(steps), async_save=False)
    for step in steps:
        checkpointer.save(step, shifted(state, step), Source({"at": step}), {})
    checkpointer.wait()
    return checkpointer


def test_damaged_checkpoints_are_set_aside_newest_first(tmp_path, state, caplog):
    checkpointer = saved_steps(tmp_path, state, [2, 4, 6])
    for step in (4, 6):
        damage(os.path.join(checkpointer.directory, str(step)))
    source = Source()
    with caplog.at_level(logging.WARNING, logger="jaxpt.checkpoint"):
        restored = checkpointer.restore_latest(state, source)
    assert source.position == {"at": 2}
    for a, b in zip(jax.tree.leaves(shifted(state, 2)), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert checkpointer.all_steps() == [2]
    names = sorted(os.listdir(checkpointer.directory))
    assert names[0] == "2" and [n.split(".")[0] for n in names[1:]] == ["4", "6"]
    assert all(".damaged-" in n for n in names[1:])
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 2 and os.path.join(checkpointer.directory, "6") in warnings[0]
    assert "OUT_OF_RANGE" in warnings[0] or "DATA_LOSS" in warnings[0]
    # New saves go on as usual beside the damaged dirs.
    checkpointer.save(8, restored, source, {})
    checkpointer.wait()
    assert checkpointer.all_steps() == [2, 8]
    checkpointer.close()


def test_no_intact_checkpoint_raises_after_setting_all_aside(tmp_path, state):
    checkpointer = saved_steps(tmp_path, state, [2])
    damage(os.path.join(checkpointer.directory, "2"))
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*2\.damaged-"):
        checkpointer.restore_latest(state, Source())
    assert checkpointer.latest_step() is None
    assert checkpointer.restore_latest(state, Source()) is None  # a rerun: from scratch
    checkpointer.close()


def test_another_runs_checkpoint_is_not_damage(tmp_path, state):
    checkpointer = saved_steps(tmp_path, state, [2])
    wider = jax.tree.map(lambda x: jnp.concatenate([x, x]) if x.ndim == 2 else x, state)
    with pytest.raises(CheckpointError, match="does not match this run's train state"):
        checkpointer.restore_latest(wider, Source())

    class Strict(Source):
        def set_state(self, position):
            raise ValueError("unknown dataset")

    with pytest.raises(CheckpointError, match="data position .* unknown dataset"):
        checkpointer.restore_latest(state, Strict())
    assert os.listdir(checkpointer.directory) == ["2"]  # nothing renamed
    checkpointer.close()


def sft_config(output_dir, tiny_dir, max_steps):
    return load_config(SFT_TINY, sft_overrides(output_dir, tiny_dir, **{
        "train.log_every": 1, "train.max_steps": max_steps, "data.eval": "null",
        "export.hf": "false", "checkpoint.every": 2, "checkpoint.keep": 3, "optim.lr": LR,
        "optim.warmup_steps": 0,
    }))


def final_params(config, mesh, stop_after_step=None):
    with setup(config, mesh=mesh) as run:
        result = train(run, stop_after_step=stop_after_step)
        return result, jax.device_get(run.state.params)


@pytest.mark.slow
def test_run_resumes_past_a_damaged_latest_checkpoint(tmp_path, tiny_dir, mesh1, caplog):
    config = sft_config(str(tmp_path / "run"), tiny_dir, 6)
    first, expected = final_params(config, mesh1)  # uninterrupted: checkpoints 2, 4, 6
    assert sorted(os.listdir(first.checkpoint_dir)) == ["2", "4", "6"]
    losses = [r["loss"] for r in train_rows(config.output_dir)]
    damage(os.path.join(first.checkpoint_dir, "6"))
    with caplog.at_level(logging.INFO):
        second, params = final_params(config, mesh1)  # the restart redoes steps 5 and 6
    assert second.step == 6 and not second.preempted
    assert any("resumed" in r.getMessage() and "step 4" in r.getMessage() for r in caplog.records)
    names = os.listdir(second.checkpoint_dir)
    assert sorted(n for n in names if n.isdigit()) == ["2", "4", "6"], names
    assert [n.split(".")[0] for n in names if not n.isdigit()] == ["6"], names
    np.testing.assert_allclose([r["loss"] for r in train_rows(config.output_dir)], losses,
                               rtol=1e-6)
    # Same machine, same program: equal up to rounding; 1e-3 of one Adam step (about lr).
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * LR)
