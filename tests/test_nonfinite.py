"""Non-finite steps: skipped inside the step (state bit-identical), counted in the optimizer
state, and after train.max_nonfinite_steps in a row the run stops with NonFiniteError,
keeping the last finite checkpoint and exporting nothing."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import SFT_TINY, TINY, sft_batch, sft_overrides, train_rows

from jaxpt import loop
from jaxpt.cli.train import main
from jaxpt.config import ConfigError, load_config
from jaxpt.models import init_model
from jaxpt.state import create_train_state, shardings_of
from jaxpt.step import NonFiniteCounts, count_nonfinite, jit_train_step, make_train_step, put_batch
from jaxpt.tasks import get_task
from jaxpt.tasks.sft import sft_loss

pytestmark = pytest.mark.usefixtures("one_device_runs")


def poisoned(loss_fn, first_bad: int, last_bad: int = 10**9):
    """``loss_fn`` whose loss (and so every gradient) is NaN on 0-based optimizer steps
    ``first_bad..last_bad``."""

    def loss(model, batch, ctx):
        out = loss_fn(model, batch, ctx)
        bad = (ctx.step >= first_bad) & (ctx.step <= last_bad)
        return out.replace(numerator=out.numerator * jnp.where(bad, jnp.nan, 1.0))

    return loss


def test_a_nonfinite_step_changes_nothing_but_the_step(mesh1):
    tx = count_nonfinite(optax.adamw(1e-2))
    with jax.set_mesh(mesh1):
        state = create_train_state(init_model(TINY, seed=0, mesh=mesh1), tx, mesh1)
        batch = sft_batch()
        step = jit_train_step(make_train_step(poisoned(sft_loss, 0, 0), tx), mesh1,
                              shardings_of(state), batch)
        before = jax.device_get(state)  # the step donates the state's buffers
        state, metrics = step(state, put_batch(batch, mesh1))
        after = jax.device_get(state)
        assert int(after.step) == 1 and float(metrics["nonfinite"]) == 1.0
        assert np.isnan(float(metrics["loss"]))
        for a, b in zip(jax.tree.leaves((before.params, before.opt_state.inner, before.rest)),
                        jax.tree.leaves((after.params, after.opt_state.inner, after.rest)),
                        strict=True):
            np.testing.assert_array_equal(a, b)
        assert (int(after.opt_state.total), int(after.opt_state.consecutive)) == (1, 1)
        assert float(metrics["nonfinite_steps"]) == 1.0

        state, metrics = step(state, put_batch(batch, mesh1))  # step 1 is finite again
        after = jax.device_get(state)
        assert float(metrics["nonfinite"]) == 0.0 and np.isfinite(float(metrics["loss"]))
        assert (int(after.opt_state.total), int(after.opt_state.consecutive)) == (1, 0)
        assert int(after.opt_state.inner[0].count) == 1  # Adam saw one update
        assert not np.array_equal(jax.tree.leaves(before.params)[0],
                                  jax.tree.leaves(after.params)[0])
    assert isinstance(after.opt_state, NonFiniteCounts)


def test_max_nonfinite_steps_is_validated():
    with pytest.raises(ConfigError, match="train.max_nonfinite_steps"):
        load_config(SFT_TINY, ["train.max_nonfinite_steps=-1"])


def config_for(output_dir, tiny_dir, **extra):
    return sft_overrides(output_dir, tiny_dir, **{
        "data.eval": "null", "checkpoint.every": 2, "checkpoint.keep": 5,
        "train.max_nonfinite_steps": 3, **extra,
    })


@pytest.mark.slow
def test_run_stops_after_max_nonfinite_steps_and_resumes_from_the_last_finite(
    tmp_path, tiny_dir, monkeypatch
):
    out = str(tmp_path / "run")
    sft = get_task("sft")
    nan_task = dataclasses.replace(
        sft, make_loss=lambda ctx: poisoned(sft.make_loss(ctx), first_bad=2)
    )
    monkeypatch.setattr(loop, "get_task", lambda name: nan_task)
    # Steps 3, 4, 5 (1-based) are NaN: step 4's checkpoint is skipped, and step 5 is caught
    # one step late (it is neither logged nor checkpointed), so step 6 ran but changes nothing.
    config = load_config(SFT_TINY, config_for(out, tiny_dir, **{
        "train.max_steps": 20, "train.log_every": 4,
    }))
    with pytest.raises(loop.NonFiniteError, match=(
        r"step 5: 3 train steps in a row .*'train\.max_nonfinite_steps' \(3\).*"
        r"latest checkpoint \(step 2\)"
    )):
        loop.run(config)
    assert os.listdir(os.path.join(out, "checkpoints")) == ["2"]
    assert not os.path.exists(os.path.join(out, "hf"))
    rows = {r["step"]: r for r in train_rows(out)}
    assert sorted(rows) == [4, 5]
    assert (rows[4]["nonfinite"], rows[4]["nonfinite_steps"]) == (1.0, 2.0)
    assert rows[5]["nonfinite_consecutive"] == 3.0 and rows[5]["loss"] == "nan"

    # Fixed (the real loss), the rerun resumes from step 2 and finishes with finite params.
    monkeypatch.setattr(loop, "get_task", get_task)
    config = load_config(SFT_TINY, config_for(out, tiny_dir, **{
        "train.max_steps": 4, "train.log_every": 1,
    }))
    with loop.setup(config) as run:
        result = loop.train(run)
        params = jax.device_get(run.state.params)
    assert result.step == 4 and result.hf_dir and os.path.isdir(result.hf_dir)
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [3, 4]
    assert all(r["nonfinite"] == 0.0 and r["nonfinite_steps"] == 0.0 for r in rows)


def test_cli_exits_nonzero_when_a_real_run_diverges(tmp_path, tiny_dir, capsys):
    out = str(tmp_path / "run")
    args = config_for(out, tiny_dir, **{
        "train.max_steps": 40, "train.log_every": 1, "optim.lr": 1e6, "optim.max_grad_norm": 0,
        "optim.warmup_steps": 0, "export.hf": "true",
    })
    assert main(["--config", SFT_TINY, *args]) == 1
    error = capsys.readouterr().err
    assert "train.max_nonfinite_steps" in error and "non-finite" in error
    assert not os.path.exists(os.path.join(out, "hf"))
    rows = train_rows(out)
    stopped = rows[-1]["step"]
    assert stopped < 40 and rows[-1]["nonfinite_consecutive"] == 3.0
    # No checkpoint holds a step of the final streak (stopped - 2 .. stopped).
    saved = [int(s) for s in os.listdir(os.path.join(out, "checkpoints"))]
    assert all(s <= stopped - 3 for s in saved), (saved, stopped)
