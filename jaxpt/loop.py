"""The one training loop, shared by every task (it never branches on the task).

config -> mesh -> task.build -> TrainState -> batch source / evaluator -> restore the latest
checkpoint -> [next batch -> jitted step -> log / eval / checkpoint]* -> final checkpoint ->
export. SIGTERM (TPU preemption) makes the loop checkpoint after the current step and
return cleanly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading

import jax
import numpy as np

from jaxpt import config as config_lib
from jaxpt.checkpoint import Checkpointer
from jaxpt.metrics import MetricsWriter, Progress
from jaxpt.optim import make_optimizer
from jaxpt.sharding import make_mesh, merged_rules
from jaxpt.state import create_train_state, num_params, shardings_of
from jaxpt.step import jit_train_step, make_train_step, put_batch
from jaxpt.tasks import RunContext, get_task

log = logging.getLogger("jaxpt")


@dataclasses.dataclass
class RunResult:
    output_dir: str
    step: int  # the last completed step
    preempted: bool
    evals: list[dict]  # {"step", "eval_loss", ...} in order
    last_metrics: dict
    checkpoint_dir: str
    hf_dir: str | None
    summary: dict


class StopSignal:
    """Turns SIGTERM into a flag the loop checks between steps (installed on the main
    thread only; elsewhere the flag can still be set by hand)."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("received signal %d: will checkpoint after this step and exit", signum)

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def batch_tokens(batch: dict) -> int:
    """Non-padding tokens of a host batch (for tokens/s): ``*segment_ids != 0``."""
    counted = [np.count_nonzero(v) for k, v in batch.items() if k.endswith("segment_ids")]
    if counted:
        return int(sum(counted))
    return int(sum(np.size(v) for k, v in batch.items() if k.endswith("input_ids")))


def _write_config(config, output_dir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            f.write(config_lib.to_yaml(config))


def _fetch(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run(config, *, stop_after_step: int | None = None) -> RunResult:
    """Train per ``config`` (resuming from ``<output_dir>/checkpoints`` if present).

    ``stop_after_step`` behaves like a preemption signal arriving during that step (tests).
    """
    task = get_task(config.task)
    cfg_train, out_dir = config.train, os.path.abspath(config.output_dir)
    _write_config(config, out_dir)
    config_dict = config_lib.to_dict(config)
    mesh = make_mesh(
        {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
    )
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg_train.batch_size % (batch_shards * cfg_train.grad_accum_steps):
        raise config_lib.ConfigError(
            f"config key 'train.batch_size' ({cfg_train.batch_size}) must be divisible by "
            f"the mesh's data x fsdp size ({batch_shards}) times 'train.grad_accum_steps' "
            f"({cfg_train.grad_accum_steps})"
        )
    ctx = RunContext(config, mesh, merged_rules(config.mesh.rules), out_dir)
    stop = StopSignal()
    writer = progress = source = checkpointer = None
    try:
        with jax.set_mesh(mesh):
            model, extras = task.build(ctx)
            tx, schedule = make_optimizer(config.optim, cfg_train.max_steps)
            state = create_train_state(model, tx, mesh, seed=config.seed, extras=extras)
            del model
            ctx.state_shardings = shardings_of(state)
            ctx.summary["params"] = num_params(state.params)
            loss_fn = task.make_loss(ctx)
            source = task.make_train_source(ctx)
            evaluate = task.make_evaluator(ctx)

            checkpointer = Checkpointer(
                os.path.join(out_dir, "checkpoints"),
                keep=config.checkpoint.keep,
                async_save=config.checkpoint.async_save,
            )
            start = 0
            if config.checkpoint.resume and checkpointer.latest_step() is not None:
                state = checkpointer.restore(state, source)
                start = int(jax.device_get(state.step))
                log.info("resumed from %s at step %d", checkpointer.directory, start)
            writer = MetricsWriter(
                out_dir, tensorboard=config.logging.tensorboard,
                wandb_cfg=config.logging.wandb, config=config_dict,
            )
            writer.truncate_after(start)
            if start == 0 and "data" in ctx.summary:
                writer.write(0, {f"data/{k}": v for k, v in ctx.summary["data"].items()})
            for reason in ctx.summary.get("data_skip_reasons", [])[:5]:
                log.warning("skipped: %s", reason)
            log.info(
                "task=%s params=%d mesh=%s data=%s", task.name, ctx.summary["params"],
                dict(mesh.shape), ctx.summary.get("data"),
            )

            evals: list[dict] = []

            def run_eval(step: int) -> None:
                if evaluate is None:
                    return
                result = evaluate(state)
                evals.append({"step": step, **result})
                writer.write(step, result)
                progress.write(
                    f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in result.items())
                )

            progress = Progress(cfg_train.max_steps, start, enabled=config.logging.progress)
            if start == 0 and cfg_train.eval_at_start:
                run_eval(0)

            train_step = None
            last_metrics: dict = {}
            last_saved = start if checkpointer.latest_step() == start else None
            last_eval = 0 if (start == 0 and cfg_train.eval_at_start) else None
            preempted = False
            step = start
            window_start = None
            while step < cfg_train.max_steps:
                batch, host_metrics = source.next(state)
                if train_step is None:
                    train_step = jit_train_step(
                        make_train_step(
                            loss_fn, tx, cfg_train.grad_accum_steps, schedule=schedule
                        ),
                        mesh, ctx.state_shardings, batch,
                    )
                state, metrics = train_step(state, put_batch(batch, mesh))
                step += 1
                progress.add_tokens(batch_tokens(batch))
                if window_start is None:  # the first step compiles: not a throughput sample
                    jax.block_until_ready(metrics)
                    progress.tokens_per_second()
                    window_start = step
                if step % cfg_train.log_every == 0 or step == cfg_train.max_steps:
                    last_metrics = {**_fetch(metrics), **host_metrics}
                    rate = progress.tokens_per_second()
                    if rate is not None:
                        last_metrics["tokens_per_s"] = rate
                    writer.write(step, last_metrics)
                    progress.update(
                        1, loss=last_metrics["loss"], lr=last_metrics.get("lr", 0.0),
                        tok_s=f"{rate or 0:.0f}",
                    )
                else:
                    progress.update(1)
                if cfg_train.eval_every and step % cfg_train.eval_every == 0:
                    run_eval(step)
                    last_eval = step
                every = config.checkpoint.every
                if every and step % every == 0:
                    checkpointer.save(step, state, source, config_dict)
                    last_saved = step
                if (
                    stop.requested
                    or checkpointer.reached_preemption(step)
                    or stop_after_step == step
                ):
                    preempted = True
                    break

            if last_saved != step:
                checkpointer.save(step, state, source, config_dict, force=True)
            checkpointer.wait()
            hf_dir = None
            if preempted:
                progress.write(
                    f"stopping at step {step}: checkpoint saved to {checkpointer.directory}"
                )
                log.warning("preempted: saved checkpoint at step %d; exiting cleanly", step)
            else:
                if last_eval != step:
                    run_eval(step)
                if config.export.hf:
                    hf_dir = os.path.join(out_dir, "hf")
                    task.export(ctx, state, hf_dir)
            return RunResult(
                output_dir=out_dir, step=step, preempted=preempted, evals=evals,
                last_metrics=last_metrics, checkpoint_dir=checkpointer.directory,
                hf_dir=hf_dir, summary=ctx.summary,
            )
    finally:
        stop.close()
        for closeable in (progress, writer, source, checkpointer):
            if closeable is not None:
                closeable.close()
