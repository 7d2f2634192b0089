"""Orbax checkpoints of a run: the train state, the data-iterator state and the config.

Layout: ``<output_dir>/checkpoints/<step>/{state,data,config,frozen}``. ``state`` is the
TrainState as sharded arrays (params, optimizer state, step, rng, extras) less its static
graphdef and its *frozen* weights: the reference of DPO/GRPO/PPO (``ref_params``) and the
LoRA base, which a resumed run re-reads from their source (``model.path`` or the task's
``ref_model``) as a fresh run does. ``frozen`` records a fingerprint of those weights
(``fingerprint``), so that resuming after their source changed is a ``CheckpointError``
rather than a silent drift. ``data`` is the batch source's position, one JSON file per
process (Grain's Orbax handler); ``config`` the resolved config. Orbax writes each step to a
temporary directory and renames it when complete, so a checkpoint is either whole or
absent. Restores go onto whatever shardings the caller's target has, so a run may resume on
another mesh. Checkpoints written before the reference was left out still restore: their
``ref_params`` are not read.

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
import hashlib
import json
import logging
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from jaxpt.sharding import replicated
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


class _FrozenMismatch(Exception):
    """The run's frozen weights differ from those the checkpoint was trained against."""


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
    """What a checkpoint stores of ``state``: all but the frozen weights (``_frozen_tree``)."""
    return {
        "params": state.params,
        "rest": nnx.filter_state(state.rest, _not_param),
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": state.rng,
        "extras": state.extras,
    }


def _frozen_tree(state: TrainState) -> dict:
    """The weights a checkpoint leaves out because the run re-derives them from their source:
    the frozen reference and the frozen LoRA base (``nnx.Param``s in ``rest``)."""
    return {"ref_params": state.ref_params, "base": nnx.filter_state(state.rest, nnx.Param)}


_OLD_ITEMS = ("ref_params",)  # in checkpoints of older versions; not read


# ------------------------------------------------------------------- fingerprint


def _mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's finalizer: a bijection of uint32 that spreads every input bit."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _words(x: jax.Array) -> jax.Array:
    """``x``'s bits as uint32 words (a trailing axis of 2 for 8-byte dtypes)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


_LANE_SEEDS = (0x9E3779B9, 0x7F4A7C15)  # two independent 32-bit hashes: 64 bits in all


def _leaf_sums(leaves: list) -> jax.Array:
    """[leaves, 2] uint32: per leaf and lane, the wrapping sum over elements of
    ``mix(word ^ mix(position ^ seed))``. Integer sums wrap mod 2**32 whatever the order, so
    the result is the same on any mesh and backend; changing any one element changes it."""
    rows = []
    for x in leaves:
        words = _words(x)
        position = jnp.zeros(words.shape, jnp.uint32)  # the global row-major index, wrapping
        for axis, n in enumerate(words.shape):
            iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
            position = position * np.uint32(n % 2**32) + iota
        rows.append(jnp.stack([
            jnp.sum(_mix32(words ^ _mix32(position ^ np.uint32(seed))), dtype=jnp.uint32)
            for seed in _LANE_SEEDS
        ]))
    return jnp.stack(rows)


def fingerprint(tree) -> str | None:
    """A hex digest of ``tree``'s arrays, bit for bit, with their paths, shapes and dtypes;
    None for a tree without arrays. The element pass runs on device (integer arithmetic
    over the bit patterns, no float reductions), so it is cheap, and exact on any mesh."""
    flat = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if not flat:
        return None
    leaves = [x for _, x in flat]
    sharding = leaves[0].sharding
    out = replicated(sharding.mesh) if isinstance(sharding, jax.NamedSharding) else None
    sums = np.asarray(jax.jit(_leaf_sums, out_shardings=out)(leaves)).astype("<u4")
    digest = hashlib.sha256()
    for (path, x), lanes in zip(flat, sums):
        digest.update(f"{jax.tree_util.keystr(path)}:{x.dtype}:{tuple(x.shape)};".encode())
        digest.update(lanes.tobytes())
    return digest.hexdigest()[:32]


def _caused_by(error: BaseException | None, cls: type) -> BaseException | None:
    """The exception of type ``cls`` in ``error``'s chain of causes, if any."""
    while error is not None:
        if isinstance(error, cls):
            return error
        error = error.__cause__ or error.__context__
    return None


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost cause (TensorStore's wrapper buries it)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return f"{type(error).__name__}: {lines[0][:300]}"


class Checkpointer:
    """Save every N steps, keep the last K, write asynchronously, resume from the latest."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True,
                 frozen_source: str = "their source", processes: set[int] | None = None):
        """``frozen_source`` says where the run re-reads its frozen weights (the reference,
        the LoRA base) from, for the error when they changed since a checkpoint.
        ``processes``: the processes that save and restore (None: all of them), when
        others take no part (the rollout processes of an RL run split across processes);
        the lowest writes the shared files."""
        self.directory = absolute_path(directory)
        self.frozen_source = frozen_source
        self._frozen_fingerprint: tuple[str | None] | None = None  # see _fingerprint
        self.processes = None if processes is None else set(processes)
        handler_options = {}
        if self.processes is not None:
            # Orbax syncs only these processes, but leaves creating the directory to us.
            multiprocessing = ocp.options.MultiprocessingOptions(
                primary_host=min(self.processes), active_processes=self.processes,
                barrier_sync_key_prefix="jaxpt_train")
            handler_options["multiprocessing_options"] = multiprocessing
            if jax.process_index() == min(self.processes):
                epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
            self._sync("jaxpt_checkpoint_directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=self.processes is None,
            cleanup_tmp_directories=True,  # partial writes of a killed run
            **handler_options,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(**handler_options),
                "data": _PositionHandler(),
                "config": ocp.JsonCheckpointHandler(**handler_options),
                "frozen": ocp.JsonCheckpointHandler(**handler_options),
            },
        )

    def _sync(self, name: str) -> None:
        """A barrier over the processes that checkpoint."""
        if jax.process_count() == 1:
            return
        if self.processes is None:
            multihost_utils.sync_global_devices(name)
        elif len(self.processes) > 1:
            from orbax.checkpoint import multihost

            multihost.sync_global_processes(name, processes=self.processes)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, source, config: dict, *, force=False) -> bool:
        """Start saving (returns once device buffers are copied; writing goes on behind)."""
        tree = _state_tree(state)
        if self.processes is not None:
            # Orbax refuses arrays that one process holds whole when there are several
            # processes (it takes them for pmap's): a lone train process saves them from
            # the host.
            tree = jax.tree.map(
                lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable
                else x, tree)
        items = {
            "state": ocp.args.StandardSave(tree),
            "data": _PositionSave(_SourceItem(source)),
            "config": ocp.args.JsonSave(config),
        }
        frozen = self._fingerprint(state)
        if frozen is not None:
            record = {"fingerprint": frozen, "source": self.frozen_source}
            items["frozen"] = ocp.args.JsonSave(record)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, state: TrainState, source, step: int | None = None) -> TrainState:
        """Restore onto ``state``'s shapes and shardings and set ``source`` to its saved
        position. Returns the restored TrainState, whose frozen weights (reference, LoRA
        base) are ``state``'s own: their values must be the ones the checkpoint was trained
        against (compared by fingerprint; ``_FrozenMismatch`` if not). ``state``'s other
        values are not used."""
        step = self.latest_step() if step is None else step
        self._check_frozen(step, state)
        target = abstract_like(_state_tree(state))
        data = _PositionRestore(_SourceItem(source))
        if any(k in self._saved_items(step) for k in _OLD_ITEMS):
            # An older version's checkpoint: restore all but its reference copy.
            with ocp.PyTreeCheckpointer() as reader:
                tree = reader.restore(
                    epath.Path(self._step_dir(step)) / "state",
                    args=ocp.args.PyTreeRestore(
                        target, partial_restore=True,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    ),
                )
            self.manager.restore(step, args=ocp.args.Composite(data=data))
        else:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=data)
            tree = self.manager.restore(step, args=args)["state"]
        frozen = nnx.filter_state(state.rest, nnx.Param)
        return state.replace(**{**tree, "rest": nnx.merge_state(frozen, tree["rest"])})

    def _saved_items(self, step: int) -> dict:
        """The top-level items of ``step``'s saved state tree (as metadata, {} if unread)."""
        try:
            return dict(self.manager.metadata(step).item_metadata["state"])
        except Exception:  # noqa: BLE001  unreadable metadata: the restore reports it
            return {}

    def _fingerprint(self, state: TrainState) -> str | None:
        """``fingerprint`` of ``state``'s frozen weights, computed once per run: they never
        change while it trains, so every save and the resume check share one pass."""
        if self._frozen_fingerprint is None:
            self._frozen_fingerprint = (fingerprint(_frozen_tree(state)),)
        return self._frozen_fingerprint[0]

    def _check_frozen(self, step: int, state: TrainState) -> None:
        """``_FrozenMismatch`` if ``state``'s frozen weights are not those ``step`` was
        trained against. Checkpoints without a record (older versions) are not checked."""
        current = self._fingerprint(state)
        path = epath.Path(self._step_dir(step)) / "frozen"
        if current is None or not path.exists():
            if current is not None:
                log.warning("checkpoint %s records no fingerprint of the frozen weights: "
                            "not checking that %s still holds them", self._step_dir(step),
                            self.frozen_source)
            return
        restored = self.manager.restore(
            step, args=ocp.args.Composite(frozen=ocp.args.JsonRestore())
        )
        record = restored["frozen"]
        if record["fingerprint"] != current:
            raise _FrozenMismatch(
                f"checkpoint {self._step_dir(step)} was trained against other frozen weights "
                f"(reference or LoRA base) than {self.frozen_source} holds now (fingerprint "
                f"{record['fingerprint']} saved from {record.get('source')}, {current} now). "
                "Checkpoints leave them out and a resumed run re-reads them from their source, "
                "which must not change: put back the weights the run started from, or use a "
                "new output_dir or checkpoint.resume=false."
            )

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
            # (With a subset of the processes checkpointing there is no all-gather over just
            # them: each decides from its own files.)
            if jax.process_count() > 1 and self.processes is None:
                failed = multihost_utils.process_allgather(np.int32(error is not None))
                if np.any(failed) and error is None:
                    error = CheckpointError("another process could not read it")
            if error is None:
                return restored
            if mismatch := _caused_by(error, _FrozenMismatch):
                raise CheckpointError(str(mismatch)) from error
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
            saved = {k: tuple(v.shape) for k, v in ocp.tree.to_flat_dict(saved, sep=".").items()
                     if k.split(".")[0] not in _OLD_ITEMS}
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
        primary = 0 if self.processes is None else min(self.processes)
        if jax.process_index() == primary:  # one rename on a shared filesystem; others wait
            os.rename(path, target)
        self._sync(f"jaxpt_set_aside_{step}")
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
        if jax.process_count() == 1 or self.processes is not None:
            return False  # a subset of processes: the loop's StopVote decides alone
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
