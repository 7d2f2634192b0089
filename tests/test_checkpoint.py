"""Checkpoints: exact resume, restore onto another mesh, and SIGTERM (preemption)."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
from tiny import ROOT, SFT_TINY, TINY, sft_overrides, train_rows

from jaxpt.checkpoint import Checkpointer
from jaxpt.config import load_config
from jaxpt.loop import run
from jaxpt.models import init_model
from jaxpt.sharding import make_mesh
from jaxpt.state import create_train_state


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


def test_restore_onto_a_different_mesh(tmp_path, mesh8):
    tx = optax.adamw(1e-3)

    class Source:
        def __init__(self, state):
            self.state = state

        def get_state(self):
            return self.state

        def set_state(self, state):
            self.state = state

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
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
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
