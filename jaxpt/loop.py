"""The one training loop, shared by every task (it never branches on the task).

``setup``: config -> mesh -> task.build -> TrainState -> loss, batch source, evaluator (a
``Run``, which benchmarks and tests also step by hand). ``train``: restore the newest intact
checkpoint -> [next batch -> jitted step -> log / eval / checkpoint]* -> final checkpoint ->
export. ``run`` is both. SIGTERM (TPU preemption) makes the loop checkpoint after the
current step and return cleanly; with several processes (``jaxpt.distributed``) a signal to
any one of them stops all of them after the next step, at the same step and checkpoint.

A step with a non-finite loss or gradient changes nothing but the step counter (see
``jaxpt.step.make_train_step``); ``train.max_nonfinite_steps`` of them in a row stop the run
with ``NonFiniteError``, with no checkpoint written after the last finite step and nothing
exported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import jax
import numpy as np
import optax
from flax import nnx

from jaxpt import config as config_lib
from jaxpt.checkpoint import Checkpointer, absolute_path
from jaxpt.distributed import StopVote
from jaxpt.host_memory import release_freed_memory
from jaxpt.metrics import MetricsWriter, Progress
from jaxpt.models.lora import trainable_filter
from jaxpt.run_spec import check_batch_fits_mesh, jit_run_step, run_mesh, run_optimizer
from jaxpt.sharding import merged_rules, use_rules
from jaxpt.state import TrainState, create_train_state, num_params, shardings_of
from jaxpt.step import LossFn, all_finite, put_batch
from jaxpt.tasks import BatchSource, RunContext, Task, common, get_task

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


class NonFiniteError(RuntimeError):
    """The run diverged: too many train steps in a row had a non-finite loss or gradient,
    or the final params are not finite. Nothing was checkpointed or exported after it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class _NonFiniteWatch:
    """Reads each step's count of consecutive skipped (non-finite) steps and raises
    ``NonFiniteError`` at ``train.max_nonfinite_steps``.

    A step is checked one step late (``step_done``: by then it has finished, so the read
    does not stall the device queue) or at once where the loop syncs anyway (``check_now``:
    logging, checkpointing, the end).
    """

    def __init__(self, limit: int, writer: MetricsWriter, checkpointer: Checkpointer):
        self.limit, self.writer, self.checkpointer = limit, writer, checkpointer
        self.pending = None

    def step_done(self, step: int, metrics: dict) -> None:
        previous, self.pending = self.pending, (step, metrics)
        if previous is not None:
            self._check(*previous)

    def check_now(self, step: int, metrics: dict) -> bool:
        """Check ``step`` (the latest); True if its update was skipped."""
        self.pending = None
        return self._check(step, metrics)

    def flush(self) -> None:
        if self.pending is not None:
            self.check_now(*self.pending)

    def _check(self, step: int, metrics: dict) -> bool:
        consecutive = int(jax.device_get(metrics["nonfinite_consecutive"]))
        if not consecutive:
            return False
        total = int(jax.device_get(metrics["nonfinite_steps"]))
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
            step, consecutive, total,
        )
        if self.limit and consecutive >= self.limit:
            self.writer.write(step, _fetch(metrics))
            self.checkpointer.wait()
            latest = self.checkpointer.latest_step()
            where = (
                f"the latest checkpoint (step {latest}) holds the last finite state"
                if latest is not None else "no checkpoint was written"
            )
            raise NonFiniteError(
                f"step {step}: {consecutive} train steps in a row had a non-finite loss or "
                f"gradient ({total} skipped in all), reaching config key "
                f"'train.max_nonfinite_steps' ({self.limit}). Stopped without checkpointing "
                f"or exporting; {where}. Lower optim.lr, clip with optim.max_grad_norm, or "
                "check the data.",
                step,
            )
        return True


@dataclasses.dataclass
class Run:
    """A run set up for training by ``setup``: what ``train`` needs, and what benchmarks and
    tests use to step a task by hand.

    As a context manager it makes the run's mesh and sharding rules current for its body
    (``activate``) and closes the batch source on exit. ``state`` is the initial train state;
    ``train`` replaces it with each new one (the old buffers are donated).
    """

    config: Any
    task: Task
    ctx: RunContext
    state: TrainState
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    loss_fn: LossFn
    source: BatchSource
    evaluate: Callable[[TrainState], dict] | None
    # train.eval_tasks: generation evals, (state) -> {"eval/<task>/<metric>": value}
    evaluate_tasks: Callable[[TrainState], dict] | None = None
    _active: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.ctx.mesh

    @contextlib.contextmanager
    def activate(self):
        """The run's mesh and logical-axis rules, for building, jitting and stepping."""
        with jax.set_mesh(self.mesh), use_rules(self.ctx.rules):
            yield self

    def jit_step(self, example_batch: dict) -> Callable:
        """The jitted train step ``(state, device batch) -> (state, metrics)`` for batches
        shaped like ``example_batch`` (host arrays), with the state's shardings and its
        buffers donated. Call it (it compiles on the first call) under ``activate()``."""
        with self.activate():
            return jit_run_step(self.ctx, self.loss_fn, self.tx, self.schedule, example_batch)

    def put_batch(self, batch: dict) -> dict:
        """A host batch as global device arrays on the run's batch sharding."""
        with self.activate():
            return put_batch(batch, self.mesh)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Self:
        context = self.activate()
        context.__enter__()
        self._active.append(context)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._active.pop().__exit__(*exc)
        finally:
            self.close()


def setup(config, *, mesh: jax.sharding.Mesh | None = None) -> Run:
    """config -> mesh -> model (``task.build``) -> TrainState -> loss, batch source and
    evaluator, as ``jaxpt.run_spec`` describes the run (plans and benchmarks size the same
    one). ``mesh`` replaces the one ``config.mesh`` describes (e.g. one device in tests);
    the config's sharding rules still apply. Writes nothing but what the task's data
    preparation writes. Close the returned ``Run`` (or use it in a ``with``)."""
    task = get_task(config.task)
    if mesh is None:
        mesh = run_mesh(config)
    ctx = RunContext(config, mesh, merged_rules(config.mesh.rules),
                     absolute_path(config.output_dir))
    with jax.set_mesh(mesh), use_rules(ctx.rules):
        check_batch_fits_mesh(config, mesh)
        built = task.build(ctx)
        if (built.ref_params is not None) != common.keeps_reference(config):
            raise RuntimeError(  # memory plans and benchmarks size the state by the rule
                f"task {task.name!r} built {'a' if built.ref_params is not None else 'no'} "
                "reference, against jaxpt.tasks.common.keeps_reference"
            )
        tx, schedule = run_optimizer(ctx, nnx.state(built.model, trainable_filter(built.model)))
        state = create_train_state(
            built.model, tx, mesh, seed=config.seed, ref_params=built.ref_params,
            extras=built.extras,
        )
        del built
        release_freed_memory()  # the build's cycles and freed heap, before the compile
        ctx.state_shardings = shardings_of(state)
        ctx.summary["params"] = num_params(state.params)
        loss_fn = task.make_loss(ctx)
        source = task.make_train_source(ctx)
        try:
            evaluate = task.make_evaluator(ctx)
            evaluate_tasks = None
            if config.train.eval_tasks:
                from jaxpt.evals.runner import make_training_evaluator

                evaluate_tasks = make_training_evaluator(config, ctx)
        except BaseException:
            source.close()
            raise
    return Run(config, task, ctx, state, tx, schedule, loss_fn, source, evaluate, evaluate_tasks)


def train(run: Run, *, stop_after_step: int | None = None) -> RunResult:
    """Restore the newest intact checkpoint of ``run`` (if ``checkpoint.resume``), step to
    ``train.max_steps`` with logging, evaluation and checkpoints, then save and export.

    ``stop_after_step`` behaves like a preemption signal arriving during that step (tests).
    Raises ``NonFiniteError`` when the run diverges (see ``train.max_nonfinite_steps``).
    Call once per ``Run``; it does not close the run.
    """
    config, ctx, task, mesh = run.config, run.ctx, run.task, run.mesh
    cfg_train, out_dir = config.train, ctx.output_dir
    _write_config(config, out_dir)
    config_dict = config_lib.to_dict(config)
    stop = StopSignal()
    writer = progress = checkpointer = None
    try:
        with run.activate():
            checkpointer = Checkpointer(
                checkpoint_directory(config, out_dir),
                keep=config.checkpoint.keep,
                async_save=config.checkpoint.async_save,
                frozen_source=common.reference_source(config),
                processes=_checkpointing_processes(config),
            )
            state, start = run.state, 0
            if config.checkpoint.resume:
                restored = checkpointer.restore_latest(state, run.source)
                if restored is not None:
                    state = run.state = restored
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

            def run_eval(step: int, *, loss: bool = True, tasks: bool = True) -> None:
                result = {}
                if loss and run.evaluate is not None:
                    result.update(run.evaluate(state))
                if tasks and run.evaluate_tasks is not None:
                    result.update(run.evaluate_tasks(state))  # own sampling seed: no train RNG
                if not result:
                    return
                evals.append({"step": step, **result})
                writer.write(step, result)
                progress.write(
                    f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in result.items())
                )

            progress = Progress(cfg_train.max_steps, start, enabled=config.logging.progress)
            if start == 0 and cfg_train.eval_at_start:
                run_eval(0)

            watch = _NonFiniteWatch(cfg_train.max_nonfinite_steps, writer, checkpointer)
            vote = StopVote(mesh)
            train_step = None
            last_metrics: dict = {}
            last_saved = start if checkpointer.latest_step() == start else None
            last_eval = 0 if (start == 0 and cfg_train.eval_at_start) else None
            last_tasks_eval = last_eval
            tasks_every = cfg_train.eval_tasks_every or cfg_train.eval_every
            preempted = False
            step = start
            window_start = None
            while step < cfg_train.max_steps:
                batch, host_metrics = run.source.next(state)
                if train_step is None:
                    train_step = run.jit_step(batch)
                step_start = time.perf_counter()
                state, metrics = train_step(state, put_batch(batch, mesh))
                run.state = state
                step += 1
                watch.step_done(step, metrics)
                progress.add_tokens(batch_tokens(batch))
                if window_start is None:  # the first step compiles: not a throughput sample
                    jax.block_until_ready(metrics)
                    first_step_s = time.perf_counter() - step_start
                    ctx.summary["first_step_s"] = round(first_step_s, 2)
                    host_metrics = {**host_metrics, "time/first_step_s": first_step_s}
                    log.info("first train step (compile + run): %.1f s", first_step_s)
                    progress.tokens_per_second()
                    window_start = step
                if step % cfg_train.log_every == 0 or step == cfg_train.max_steps:
                    watch.check_now(step, metrics)
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
                loss_now = bool(cfg_train.eval_every) and step % cfg_train.eval_every == 0
                tasks_now = bool(tasks_every) and step % tasks_every == 0
                if loss_now or tasks_now:
                    run_eval(step, loss=loss_now, tasks=tasks_now)
                    last_eval = step if loss_now else last_eval
                    last_tasks_eval = step if tasks_now else last_tasks_eval
                every = config.checkpoint.every
                if every and step % every == 0:
                    # A checkpoint always holds the state after a finite step.
                    if watch.check_now(step, metrics):
                        log.warning("step %d was skipped: not checkpointing it", step)
                    else:
                        checkpointer.save(step, state, run.source, config_dict)
                        last_saved = step
                # Every process stops at the same step, whichever host was signalled.
                if vote.vote(stop.requested or stop_after_step == step) or (
                    checkpointer.reached_preemption(step)
                ):
                    preempted = True
                    break

            watch.flush()
            if last_saved != step:
                checkpointer.save(step, state, run.source, config_dict, force=True)
            checkpointer.wait()
            hf_dir = None
            if preempted:
                progress.write(
                    f"stopping at step {step}: checkpoint saved to {checkpointer.directory}"
                )
                log.warning("preempted: saved checkpoint at step %d; exiting cleanly", step)
            else:
                if last_eval != step or last_tasks_eval != step:
                    run_eval(step, loss=last_eval != step, tasks=last_tasks_eval != step)
                if config.export.hf:
                    if not bool(jax.device_get(jax.jit(all_finite)(state.params))):
                        raise NonFiniteError(
                            f"step {step}: the final params are not all finite; not "
                            "exporting them", step,
                        )
                    hf_dir = os.path.join(out_dir, "hf")
                    task.export(ctx, state, hf_dir)
            return RunResult(
                output_dir=out_dir, step=step, preempted=preempted, evals=evals,
                last_metrics=last_metrics, checkpoint_dir=checkpointer.directory,
                hf_dir=hf_dir, summary=ctx.summary,
            )
    finally:
        stop.close()
        for closeable in (progress, writer, checkpointer):
            if closeable is not None:
                closeable.close()


def _checkpointing_processes(config) -> set[int] | None:
    """The train processes of an RL run split across processes (its rollout processes never
    checkpoint), else None: every process."""
    from jaxpt.tasks.rl.placement import process_sides

    sides = process_sides(config)
    return None if sides is None else sides[0]


def checkpoint_directory(config, output_dir: str) -> str:
    """``checkpoint.directory`` (local or a URL such as ``gs://``), else
    ``<output_dir>/checkpoints``."""
    if config.checkpoint.directory:
        return absolute_path(config.checkpoint.directory)
    return os.path.join(output_dir, "checkpoints")


def run(config, *, stop_after_step: int | None = None) -> RunResult:
    """Train per ``config`` (``setup`` then ``train``), resuming from the newest checkpoint
    in ``checkpoint_directory(config, output_dir)`` if present. In a rollout process of an
    RL run split across processes, serve the trainer rollouts instead
    (``jaxpt.rollout_worker``)."""
    from jaxpt.tasks.rl.placement import process_role

    if process_role(config) == "rollout":
        return _serve_rollouts(config)
    with setup(config) as prepared:
        return train(prepared, stop_after_step=stop_after_step)


def _serve_rollouts(config) -> RunResult:
    """A rollout process's run: its step is the last train step its rollouts fed."""
    from jaxpt.rollout_worker import serve

    served = serve(config)
    out_dir = absolute_path(config.output_dir)
    return RunResult(
        output_dir=out_dir, step=served["step"], preempted=served["stopped"], evals=[],
        last_metrics={}, checkpoint_dir=checkpoint_directory(config, out_dir), hf_dir=None,
        summary={"rollouts_sent": served["rollouts"]},
    )
