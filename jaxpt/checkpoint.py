"""Orbax checkpoints of a run: the train state, the data-iterator state and the config.

Layout: ``<output_dir>/checkpoints/<step>/{state,data,config}``. ``state`` is the whole
TrainState except its static graphdef (params, optimizer state, step, rng, extras) as
sharded arrays; ``data`` is the batch source's position, one JSON file per process (Grain's
Orbax handler); ``config`` the resolved config. Orbax writes each step to a temporary
directory and renames it when complete, so a checkpoint is either whole or absent. Restores
go onto whatever shardings the caller's target has, so a run may resume on another mesh.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxpt.state import TrainState, abstract_like

log = logging.getLogger(__name__)


class _SourceItem:
    """Adapts a BatchSource (dict state) to Grain's Orbax handler (bytes state)."""

    def __init__(self, source):
        self.source = source

    def get_state(self) -> bytes:
        return json.dumps(self.source.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.source.set_state(json.loads(state))

    def start_prefetch(self) -> None:  # called by Grain's handler after a restore
        pass


def _state_tree(state: TrainState) -> dict:
    return {
        "params": state.params,
        "rest": state.rest,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": state.rng,
        "extras": state.extras,
    }


class Checkpointer:
    """Save every N steps, keep the last K, write asynchronously, resume from the latest."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
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
                "data": grain.checkpoint.CheckpointHandler(),
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
            data=grain.checkpoint.CheckpointSave(_SourceItem(source)),
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
                data=grain.checkpoint.CheckpointRestore(_SourceItem(source)),
            ),
        )
        tree = restored["state"]
        return state.replace(**tree)

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
