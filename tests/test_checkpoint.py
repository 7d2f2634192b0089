"""Checkpoints: exact resume, restore onto another mesh, SIGTERM (preemption), and the
fingerprint of the frozen weights they leave out."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from tiny import ROOT, SFT_TINY, TINY, one_device_env, sft_overrides, train_rows

from jaxpt.checkpoint import (
    Checkpointer,
    _PositionSave,
    _SourceItem,
    _state_tree,
    fingerprint,
)
from jaxpt.config import load_config
from jaxpt.loop import run
from jaxpt.models import init_model
from jaxpt.sharding import make_mesh
from jaxpt.state import copy_params, create_train_state

pytestmark = pytest.mark.usefixtures("one_device_runs")  # mesh tests pass their meshes


def overrides(output_dir, model_path, **extra):
    return sft_overrides(output_dir, model_path, **{
        "train.log_every": 1, "data.eval": "null", "export.hf": "false", "checkpoint.every": 2,
        **extra,
    })


def _has_a_train_row(path) -> bool:
    """Whether the (still being written) metrics file holds a complete train row."""
    if not path.exists():
        return False
    lines = path.read_text().splitlines(keepends=True)
    return any(line.endswith("\n") and '"loss"' in line for line in lines)


def test_resume_after_stop_is_bit_exact(tmp_path, tiny_dir):
    full = str(tmp_path / "full")
    run(load_config(SFT_TINY, overrides(full, tiny_dir, **{"train.max_steps": 5})))
    resumed = str(tmp_path / "resumed")
    # Checkpoints in their own directory (as a gs:// bucket for multi-host runs).
    shared = str(tmp_path / "shared" / "ckpts")
    config = load_config(SFT_TINY, overrides(resumed, tiny_dir, **{
        "train.max_steps": 5, "checkpoint.directory": shared}))
    first = run(config, stop_after_step=3)  # as if preempted during step 3
    assert first.preempted and first.step == 3 and first.hf_dir is None
    assert first.checkpoint_dir == shared and not os.path.exists(f"{resumed}/checkpoints")
    assert sorted(os.listdir(first.checkpoint_dir)) == ["2", "3"]
    second = run(config)
    assert not second.preempted and second.step == 5
    assert sorted(os.listdir(second.checkpoint_dir)) == ["4", "5"]  # keep: 2
    a, b = train_rows(full), train_rows(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for key in ("loss", "grad_norm", "lr", "tokens"):
        assert [r[key] for r in a] == [r[key] for r in b], key


class Source:
    def __init__(self, state):
        self.state = state

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


def test_restore_onto_a_different_mesh(tmp_path, mesh8):
    tx = optax.adamw(1e-3)
    with jax.set_mesh(mesh8):
        saved = create_train_state(init_model(TINY, seed=4, mesh=mesh8), tx, mesh8, seed=9)
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), async_save=True)
    checkpointer.save(7, saved, Source({"next_index": 42}), {"task": "sft"})
    checkpointer.wait()
    for shape in ({"fsdp": 4, "tensor": 2}, {"data": 8}):
        mesh = make_mesh(shape)
        with jax.set_mesh(mesh):
            fresh = create_train_state(init_model(TINY, seed=5, mesh=mesh), tx, mesh, seed=1)
        source = Source(None)
        restored = checkpointer.restore(fresh, source)
        assert source.state == {"next_index": 42}
        for a, b, f in zip(jax.tree.leaves(saved), jax.tree.leaves(restored),
                           jax.tree.leaves(fresh)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert b.sharding == f.sharding
    assert checkpointer.restore_config() == {"task": "sft"}
    checkpointer.close()


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, tiny_dir):
    out = tmp_path / "run"
    args = overrides(str(out), tiny_dir, **{"train.max_steps": 100000, "checkpoint.every": 0})
    env = one_device_env()
    # Output to a file, not a pipe nobody reads until the end (a full pipe blocks the child).
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxpt.train", "--config", SFT_TINY, *args],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True,
        )
    try:
        # Only a guard against hangs: on a loaded machine start-up and compiling take minutes.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if _has_a_train_row(out / "metrics.jsonl"):
                break
            time.sleep(0.2)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert _has_a_train_row(out / "metrics.jsonl"), "no train step within 600 s"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "preempted" in output
    last = train_rows(str(out))[-1]["step"]
    assert os.listdir(out / "checkpoints") == [str(last)]
    assert last < 100000


def test_fingerprint_is_exact_across_meshes_and_sees_one_ulp_or_a_swap(mesh8, mesh1):
    params = []
    for mesh in (mesh8, mesh1):
        with jax.set_mesh(mesh):
            params.append(nnx.state(init_model(TINY, seed=4, mesh=mesh), nnx.Param))
    sharded, single = params
    assert fingerprint(sharded) == fingerprint(single) is not None
    assert fingerprint({"ref_params": None}) is None
    leaves, treedef = jax.tree.flatten(single)
    i = max(range(len(leaves)), key=lambda j: leaves[j].size)  # a random matrix
    x = leaves[i].reshape(-1)
    assert x[0] != x[1]
    one_ulp = x.at[0].set(jnp.nextafter(x[0], jnp.inf))
    swapped = x.at[jnp.array([0, 1])].set(x[jnp.array([1, 0])])
    for changed in (one_ulp, swapped):
        changed_leaves = [*leaves[:i], changed.reshape(leaves[i].shape), *leaves[i + 1:]]
        assert fingerprint(jax.tree.unflatten(treedef, changed_leaves)) != fingerprint(single)


def test_a_checkpoint_holding_an_old_reference_copy_restores_without_it(tmp_path, mesh1):
    """Checkpoints of older versions stored ``ref_params``: they restore, and the run keeps
    its own (re-derived) reference."""
    tx = optax.adamw(1e-3)
    with jax.set_mesh(mesh1):
        model = init_model(TINY, seed=4, mesh=mesh1)
        saved = create_train_state(model, tx, mesh1, seed=9, ref_params=copy_params(model))
        fresh_model = init_model(TINY, seed=5, mesh=mesh1)
        fresh = create_train_state(fresh_model, tx, mesh1, ref_params=copy_params(fresh_model))
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    old_layout = {**_state_tree(saved), "ref_params": saved.ref_params}
    checkpointer.manager.save(7, args=ocp.args.Composite(
        state=ocp.args.StandardSave(old_layout),
        data=_PositionSave(_SourceItem(Source({"next_index": 42}))),
        config=ocp.args.JsonSave({}),
    ))
    checkpointer.wait()
    source = Source(None)
    restored = checkpointer.restore(fresh, source)
    assert source.state == {"next_index": 42}
    for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.ref_params is fresh.ref_params
    checkpointer.close()
