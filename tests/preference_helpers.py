"""Shared by test_rm.py and test_dpo.py: a tiny checkpoint, fast overrides, and a few train
steps of a task on a given mesh (the loop's own pieces, without its all-devices mesh)."""

import json
import os

import jax
import numpy as np
from tiny import TINY, make_tiny_dir  # noqa: F401  (re-exported)

from jaxpt.config import load_config
from jaxpt.optim import make_optimizer
from jaxpt.sharding import merged_rules
from jaxpt.state import create_train_state, shardings_of
from jaxpt.step import jit_train_step, make_train_step, put_batch
from jaxpt.tasks import RunContext, get_task

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
    task = get_task(config.task)
    ctx = RunContext(config, mesh, merged_rules(config.mesh.rules), config.output_dir)
    with jax.set_mesh(mesh):
        model, extras = task.build(ctx)
        tx, schedule = make_optimizer(config.optim, config.train.max_steps)
        state = create_train_state(model, tx, mesh, seed=config.seed, extras=extras)
        ctx.state_shardings = shardings_of(state)
        source = task.make_train_source(ctx)
        evaluate = task.make_evaluator(ctx)
        step_fn = None
        history = []
        for _ in range(num_steps):
            batch, _ = source.next(state)
            if step_fn is None:
                step_fn = jit_train_step(
                    make_train_step(task.make_loss(ctx), tx, config.train.grad_accum_steps,
                                    schedule=schedule),
                    mesh, ctx.state_shardings, batch,
                )
            state, metrics = step_fn(state, put_batch(batch, mesh))
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        evaluation = evaluate(state) if evaluate is not None else None
        source.close()
    return state, history, evaluation


def assert_close_trees(a, b, rtol=1e-4, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def train_rows(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]
