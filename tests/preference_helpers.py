"""Shared by test_rm.py and test_dpo.py: a tiny checkpoint, fast overrides, and a few train
steps of a task on a given mesh (the loop's own setup and jitted step, on that mesh)."""

import os

import jax
import numpy as np
from tiny import TINY, make_tiny_dir, train_rows  # noqa: F401  (re-exported)

from jaxpt.config import load_config
from jaxpt.loop import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fast_overrides(output_dir, model_path, **extra) -> list[str]:
    values = {
        "output_dir": output_dir, "model.path": model_path, "model.dtype": "float32",
        "data.seq_len": 80, "train.batch_size": 8, "train.log_every": 1,
        "train.eval_batches": 1, "data.arithmetic.num_train": 64,
        "data.arithmetic.num_test": 8, "logging.progress": "false",
        "logging.tensorboard": "false", "optim.lr": 3e-3, "optim.warmup_steps": 0,
        "checkpoint.every": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def config_for(name: str, overrides: list[str]):
    return load_config(os.path.join(ROOT, "configs", f"{name}_tiny.yaml"), overrides)


def train_steps(config, mesh, num_steps: int):
    """(final TrainState, per-step metrics, eval result) of ``num_steps`` steps on ``mesh``."""
    with setup(config, mesh=mesh) as run:
        state, step_fn, history = run.state, None, []
        for _ in range(num_steps):
            batch, _ = run.source.next(state)
            if step_fn is None:
                step_fn = run.jit_step(batch)
            state, metrics = step_fn(state, run.put_batch(batch))
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        evaluation = run.evaluate(state) if run.evaluate is not None else None
    return state, history, evaluation


def assert_close_trees(a, b, rtol=1e-4, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


