"""Orbax checkpoints of a run: the train state, the data-iterator state and the config.

Layout: ``<output_dir>/checkpoints/<step>/{state,data,config}``. ``state`` is the whole
TrainState except its static graphdef (params, optimizer state, step, rng, reference, extras) as
sharded arrays; ``data`` is the batch source's position, one JSON file per process (Grain's
Orbax handler); ``config`` the resolved config. Orbax writes each step to a temporary
directory and renames it when complete, so a checkpoint is either whole or absent. Restores
go onto whatever shardings the caller's target has, so a run may resume on another mesh.

A checkpoint that was committed but cannot be read back (a data file truncated by a full
disk or an interrupted copy) is *damaged*: ``restore_latest`` logs which one and why,
renames it to ``<step>.damaged-<time>`` (a name Orbax ignores; nothing is deleted) and
tries the next newest. If every checkpoint is damaged it raises ``CheckpointError`` after
setting them all aside, so a rerun starts from scratch only when asked to. A checkpoint
whose arrays do not match the run's train state (another model or optimizer) is not
damaged: that is a ``CheckpointError`` and nothing is renamed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from jaxpt.state import TrainState, abstract_like

log = logging.getLogger(__name__)


def _not_param(path, value) -> bool:
    return not isinstance(value, nnx.Param)


def absolute_path(path: str) -> str:
    """``path`` made absolute; a URL such as ``gs://bucket/run`` (Orbax writes there through
    etils ``epath``) is kept as it is."""
    return path if "://" in path else os.path.abspath(path)


class CheckpointError(RuntimeError):
    """No checkpoint can be resumed from, or one does not fit this run's train state."""


class _PositionMismatch(Exception):
    """The batch source rejected a saved position that was read back intact."""


class _SourceItem:
    """Adapts a BatchSource (dict state) to Grain's Orbax handler (bytes state)."""

    def __init__(self, source):
        self.source = source

    def get_state(self) -> bytes:
        return json.dumps(self.source.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        position = json.loads(state)  # a damaged file fails here
        try:
            self.source.set_state(position)
        except Exception as error:
            raise _PositionMismatch(str(error)) from error

    def start_prefetch(self) -> None:  # called by Grain's handler after a restore
        pass


class _PositionHandler(grain.checkpoint.CheckpointHandler):
    """Grain's handler (one ``process_<i>-of-<n>.json`` per process), except that a restore
    with another process count reads process 0's file: jaxpt's batch sources keep the
    same position on every process (each reads the global batch), so a checkpoint of a
    2-host run resumes on 1 host or 4."""

    def restore(self, directory, item=None, args=None):
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        saved = sorted(directory.glob("process_0-of-*.json"))
        if own.exists() or not saved:
            return super().restore(directory, item, args)
        item = item or args.item
        item.set_state(saved[0].read_text().encode())
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(_PositionHandler, for_save=True)
@dataclasses.dataclass
class _PositionSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_PositionHandler, for_restore=True)
@dataclasses.dataclass
class _PositionRestore(ocp.args.CheckpointArgs):
    item: Any


def _state_tree(state: TrainState) -> dict:
    return {
        "params": state.params,
        # Frozen base weights (LoRA) are re-read from the model path, not checkpointed.
        "rest": nnx.filter_state(state.rest, _not_param),
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": state.rng,
        "ref_params": state.ref_params,
        "extras": state.extras,
    }


def _caused_by(error: BaseException | None, cls: type) -> bool:
    while error is not None:
        if isinstance(error, cls):
            return True
        error = error.__cause__ or error.__context__
    return False


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost cause (TensorStore's wrapper buries it)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return f"{type(error).__name__}: {lines[0][:300]}"


class Checkpointer:
    """Save every N steps, keep the last K, write asynchronously, resume from the latest."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = absolute_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # partial writes of a killed run
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": _PositionHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, source, config: dict, *, force=False) -> bool:
        """Start saving (returns once device buffers are copied; writing goes on behind)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_state_tree(state)),
            data=_PositionSave(_SourceItem(source)),
            config=ocp.args.JsonSave(config),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, state: TrainState, source, step: int | None = None) -> TrainState:
        """Restore onto ``state``'s shapes and shardings (its values are not used) and set
        ``source`` to its saved position. Returns the restored TrainState."""
        step = self.latest_step() if step is None else step
        target = abstract_like(_state_tree(state))
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=_PositionRestore(_SourceItem(source)),
            ),
        )
        tree = restored["state"]
        frozen = nnx.filter_state(state.rest, nnx.Param)
        return state.replace(**{**tree, "rest": nnx.merge_state(frozen, tree["rest"])})

    def restore_latest(self, state: TrainState, source) -> TrainState | None:
        """Restore the newest intact checkpoint (see ``restore``), setting damaged ones
        aside as described in the module docstring. None when there is no checkpoint."""
        set_aside = []
        while (step := self.latest_step()) is not None:
            error = None
            try:
                restored = self.restore(state, source, step)
            except Exception as e:  # noqa: BLE001  Orbax/TensorStore raise plain Exceptions
                error = e
            # Every process must take the same branch, even if only one host's files broke.
            if jax.process_count() > 1:
                failed = multihost_utils.process_allgather(np.int32(error is not None))
                if np.any(failed) and error is None:
                    error = CheckpointError("another process could not read it")
            if error is None:
                return restored
            if _caused_by(error, _PositionMismatch):
                raise CheckpointError(
                    f"the data position saved in {self._step_dir(step)} does not fit this "
                    f"run's batch source (changed data settings?): {_root_cause(error)}"
                ) from error
            self._check_layout(step, state, error)
            set_aside.append(self._set_aside(step, error))
        if set_aside:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}: set aside {', '.join(set_aside)} "
                "(see the warnings above). Move one back to retry it, or rerun to start "
                "from scratch."
            )
        return None

    def _check_layout(self, step: int, state: TrainState, error: Exception) -> None:
        """Raise CheckpointError if ``step``'s saved arrays (as its metadata lists them) do
        not match ``state``'s: a changed run, not a damaged checkpoint. Unreadable metadata
        counts as damage and returns."""
        try:
            saved = self.manager.metadata(step).item_metadata["state"]
            saved = {k: tuple(v.shape) for k, v in ocp.tree.to_flat_dict(saved, sep=".").items()}
        except Exception:  # noqa: BLE001
            return
        wanted = {
            k: tuple(v.shape) for k, v in ocp.tree.to_flat_dict(_state_tree(state), sep=".").items()
        }
        if saved == wanted:
            return
        differences = sorted(set(saved) ^ set(wanted)) or sorted(
            k for k in saved if saved[k] != wanted[k]
        )
        raise CheckpointError(
            f"checkpoint {self._step_dir(step)} does not match this run's train state (another "
            f"model, task or optimizer?); differing arrays include {differences[:3]}. Use a new "
            "output_dir or set checkpoint.resume=false."
        ) from error

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _set_aside(self, step: int, error: Exception) -> str:
        """Rename a damaged step dir out of Orbax's sight; returns its new path."""
        path = self._step_dir(step)
        target = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
        suffix = 1
        while os.path.exists(target):  # damaged again within the same second
            target, suffix = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{suffix}", suffix + 1
        log.warning(
            "checkpoint %s is damaged and cannot be restored (%s); moving it to %s and "
            "trying the previous one", path, _root_cause(error), target,
        )
        if jax.process_index() == 0:  # one rename on a shared filesystem; others wait below
            os.rename(path, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxpt_set_aside_{step}")
        self.manager.reload()
        return target

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored["config"]

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any has been told to stop (multi-host sync point)."""
        if jax.process_count() == 1:
            return False
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
