"""Asynchronous rollouts: the sampler runs ahead of the update it feeds.

With ``rl.max_staleness`` k > 0 (or a split placement, ``jaxpt.tasks.rl.placement``) a
``RolloutPipeline`` produces rollouts on a worker thread while the trainer updates. The
schedule is fixed, so timing never changes a result: the policy version of the weights
after ``v`` rollouts trained is ``v``, and rollout ``i`` is always sampled with version
``max(0, i - k)``. When the trainer asks for rollout ``i`` it publishes version ``i`` (the
weights move to the rollout side, ``WeightSync``), which lets the worker start rollout
``i + k``; it then waits for rollout ``i``, which the worker began while rollout ``i - 1``
trained. Each batch's lag (``staleness``) is ``min(i, k)`` versions.

The rollout side holds the weights of every version a started or queued rollout samples
with: two when sampling keeps up with the update (the version sampling and the one just
published), up to ``k + 1`` when it falls behind.

A checkpoint waits for the rollouts in flight and saves the finished ones with their
versions: a resumed run takes them and publishes its next version exactly where the
uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from jaxpt.tasks.rl.batch import decode_arrays, encode_arrays


@dataclasses.dataclass
class Produced:
    """One finished rollout, as the worker hands it to the trainer."""

    index: int  # the rollout's position in the run
    version: int  # policy version (rollouts trained) of the weights that sampled it
    batch: dict  # host train batch (the task's ``make_batch``)
    metrics: dict  # rollout metrics (rewards, lengths, timings)
    log_rows: list  # the first rows for completions.jsonl (advantage added when taken)
    advantages: np.ndarray  # [B] per-row advantage (make_batch's)

    def arrays(self) -> dict:
        """The train batch and the advantages as one dict of host arrays (what a checkpoint
        or another process receives; ``with_arrays`` reads it back)."""
        return {**self.batch, "__advantages": np.asarray(self.advantages)}

    @classmethod
    def with_arrays(cls, index: int, version: int, arrays: dict, metrics: dict,
                    log_rows: list) -> Produced:
        batch = dict(arrays)
        advantages = batch.pop("__advantages")
        return cls(index, version, batch, metrics, log_rows, advantages)

    def to_state(self) -> dict:
        return {"index": self.index, "version": self.version,
                "batch": encode_arrays(self.arrays()),
                "metrics": json.dumps(self.metrics), "log_rows": json.dumps(self.log_rows)}

    @classmethod
    def from_state(cls, state: dict) -> Produced:
        return cls.with_arrays(int(state["index"]), int(state["version"]),
                               decode_arrays(state["batch"]), json.loads(state["metrics"]),
                               json.loads(state["log_rows"]))


def take_metrics(index: int, produced: Produced, sync_bytes: int, sync_seconds: float,
                 trainer_wait_s: float, sampler_idle_s: float) -> dict:
    """What a pipeline logs with rollout ``index`` (the same keys in one process or two)."""
    return {
        "weight_sync/bytes": float(sync_bytes),
        "weight_sync/seconds": sync_seconds,
        "time/trainer_wait_s": trainer_wait_s,
        "time/sampler_idle_s": sampler_idle_s,
        "staleness": float(index - produced.version),
        "policy_version": float(index),
    }


class WeightSync:
    """Moves the policy's weights to the rollout side after each update.

    Split: ``jax.device_put`` device to device onto the rollout mesh, each leaf with the
    same partition spec as in training (the rollout mesh has the same axis names).
    Colocated: a copy on the same devices (the train step donates the state it updates).
    Trainable params move every version; the non-trainable rest (the frozen base under
    LoRA) moves once: training never changes it. Bytes and seconds of the last move are
    kept for the metrics.
    """

    def __init__(self, rollout_mesh):
        self.rollout_mesh = rollout_mesh
        self._rest = None
        self.bytes, self.seconds = 0, 0.0
        self.last = None  # the newest (params, rest) on the rollout side

    def target_shardings(self, tree):
        """Where ``tree``'s leaves (arrays or ShapeDtypeStructs with shardings) land on the
        rollout side."""
        from jax.sharding import NamedSharding

        if self.rollout_mesh is None:
            return jax.tree.map(lambda x: x.sharding, tree)
        return jax.tree.map(
            lambda x: NamedSharding(self.rollout_mesh, x.sharding.spec)
            if isinstance(x.sharding, NamedSharding)
            else NamedSharding(self.rollout_mesh, jax.sharding.PartitionSpec()),
            tree,
        )

    def _move(self, tree):
        return jax.device_put(tree, self.target_shardings(tree), may_alias=False)

    def __call__(self, params, rest) -> tuple[Any, Any]:
        start = time.perf_counter()
        moved = [params]
        params = self._move(params)
        if self._rest is None:
            moved.append(rest)
            self._rest = self._move(rest)
        jax.block_until_ready((params, self._rest))
        self.seconds = time.perf_counter() - start
        self.bytes = sum(x.nbytes for x in jax.tree.leaves(moved))
        self.last = (params, self._rest)
        return self.last


# (rollout index, policy version, (graphdef, params, rest) on the rollout side) -> Produced
Produce = Callable[[int, int, tuple], Produced]


class RolloutPipeline:
    """Runs ``produce`` for rollout after rollout on one worker thread, ``max_staleness``
    policy versions ahead of the trainer (see the module docstring)."""

    def __init__(self, produce: Produce, max_staleness: int, sync: WeightSync):
        self.produce, self.max_staleness, self.sync = produce, max_staleness, sync
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="jaxpt-rollouts")
        self._queue: dict[int, Future] = {}
        self.submitted = 0  # rollouts handed to the worker (finished or not)
        self._last_end: float | None = None  # when the worker finished its last rollout
        self._idle: dict[int, float] = {}

    def take(self, index: int, policy: tuple) -> tuple[Produced, dict]:
        """Publish the weights of version ``index`` (``policy``: graphdef, params, rest of
        the train state after ``index`` rollouts trained), start every rollout it allows,
        and wait for rollout ``index``. Returns it with the pipeline's metrics."""
        graphdef, params, rest = policy
        params, rest = self.sync(params, rest)
        while self.submitted <= index + self.max_staleness:
            j = self.submitted
            self._queue[j] = self._worker.submit(self._run, j, index, (graphdef, params, rest))
            self.submitted += 1
        start = time.perf_counter()
        produced = self._queue.pop(index).result()
        return produced, take_metrics(index, produced, self.sync.bytes, self.sync.seconds,
                                      time.perf_counter() - start, self._idle.pop(index, 0.0))

    def _run(self, index: int, version: int, policy: tuple) -> Produced:
        start = time.perf_counter()
        if self._last_end is not None:
            self._idle[index] = start - self._last_end
        try:
            return self.produce(index, version, policy)
        finally:
            self._last_end = time.perf_counter()

    def finished(self) -> list[Produced]:
        """Every rollout handed to the worker, after waiting for those in flight (for a
        checkpoint), in order."""
        return [self._queue[j].result() for j in sorted(self._queue)]

    def restore(self, produced: list[Produced], submitted: int) -> None:
        """Queue rollouts a checkpoint saved (``finished``), as if just produced, with
        ``submitted`` rollouts handed to the worker so far."""
        self.close()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="jaxpt-rollouts")
        self._queue, self._idle, self._last_end = {}, {}, None
        for item in produced:
            future: Future = Future()
            future.set_result(item)
            self._queue[item.index] = future
        self.submitted = submitted

    def close(self) -> None:
        for future in self._queue.values():
            future.cancel()
        self._worker.shutdown(wait=True)
