"""Asynchronous RL across processes: one side samples, the other trains.

When a split run's rollout devices and train devices belong to different processes
(``placement.process_sides``), the train processes run the normal loop and the rollout
processes run ``RolloutServer`` (``jaxpt.rollout_worker``) and never build a train state.
Everything crosses between them through one ``PeerLink`` (``jaxpt.tasks.rl.transport``:
JAX collectives, device to device), in a fixed order that follows the single-process
schedule of ``jaxpt.tasks.rl.pipeline``: rollout ``i`` is sampled with policy version
``max(start, i - k)``, ``k = rl.max_staleness``, ``start`` the first rollout of this launch.

The trainer, for each rollout ``i`` it trains (``RemotePipeline.take``):

1. sends a control document ``{"version": i}`` (the first one also carries the run's key
   data, the prompt position, the number of rollouts the run trains in all and a hash of
   the params' paths);
2. sends version ``i``'s trainable params (the non-trainable rest once, with version
   ``start``), device to device;
3. receives rollout ``i``: a document (index, version, metrics, completions-log rows,
   prompt position, array layout), then its arrays (the train batch of ``make_batch`` and
   the per-row advantages).

At ``close`` it sends ``{"stop": true}`` if the rollout side still waits for a version
(a preempted or failed trainer), so neither side blocks on a transfer the other will not
match. The rollout side receives version ``start`` first; then for each rollout ``i`` it
receives versions until it holds ``max(start, i - k)`` (only with ``k = 0`` does that
wait), produces rollout ``i``, receives version ``i`` if it has not yet (the trainer sends
it before asking for rollout ``i``), and sends rollout ``i``; it keeps the last ``k + 1``
versions. With ``k >= 1`` rollout ``i + 1`` is produced while the trainer trains rollout
``i``. It stops after the run's last rollout or at a stop document.

Documents (JSON, so metric keys and log rows need not be known in advance, and floats
round-trip exactly) travel as a uint32 length, then the UTF-8 bytes in a uint8 array padded
to a power of two (few shapes, so few compiled transfers).

A resumed trainer sends its restored rollout count and prompt position in the first
control: the rollout side continues the prompt order exactly, but samples the first rollouts
after the resume with the first version it receives (the versions they had in the
uninterrupted run are gone), so those are less stale than they would have been. Rollouts a
single-process checkpoint queued are dropped and sampled again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt.tasks.rl.pipeline import Produced, take_metrics

log = logging.getLogger(__name__)

_MIN_DOC_BYTES = 256


def send_doc(link, doc: dict):
    """Send a JSON document over ``link`` (the peer calls ``recv_doc``); returns the stats
    of the payload transfer."""
    data = json.dumps(doc).encode()
    link.send(np.array([len(data)], np.uint32))
    buffer = np.zeros(_doc_capacity(len(data)), np.uint8)
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    return link.send(buffer)


def recv_doc(link) -> dict:
    """Receive the JSON document the peer ``send_doc``s."""
    size = int(_host(link.recv(jax.ShapeDtypeStruct((1,), np.uint32)))[0])
    buffer = _host(link.recv(jax.ShapeDtypeStruct((_doc_capacity(size),), np.uint8)))
    return json.loads(buffer[:size].tobytes().decode())


def _doc_capacity(size: int) -> int:
    return max(_MIN_DOC_BYTES, 1 << (size - 1).bit_length())


def _host(x) -> np.ndarray:
    """A received (replicated) array on this host."""
    return np.asarray(x.addressable_data(0))


def paths_hash(tree) -> str:
    """A hash of a pytree's leaf paths, shapes and dtypes: both sides check that they flatten
    the policy's params alike before the first weights cross as a list of leaves."""
    text = repr([(jax.tree_util.keystr(path), tuple(x.shape), jnp.dtype(x.dtype).name)
                 for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]])
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def rollouts_to_train(config, reuse: int) -> int:
    """How many rollouts a run of ``train.max_steps`` trains, each ``reuse`` steps."""
    return -(-config.train.max_steps // reuse)


def trainer_pipeline(source):
    """The pipeline of ``source`` (a ``RolloutSource``) in a train process of a run whose
    rollout side lives in other processes: a ``RemotePipeline``; None otherwise."""
    from jaxpt.tasks.rl.placement import process_role

    if process_role(source.ctx.config) != "train":
        return None
    return RemotePipeline(source)


def peer_link(train_mesh, rollout_mesh):
    """The link both sides of a run build alike: rollout mesh first, train mesh second."""
    from jaxpt.tasks.rl.transport import PeerLink

    return PeerLink(rollout_mesh, train_mesh)


class RemotePipeline:
    """The trainer's side: ``take(index, policy)`` as ``RolloutPipeline.take`` (same
    results, same metrics), with the rollouts produced by another process (see the module
    docstring for the call order)."""

    def __init__(self, source):
        self.source = source
        self.max_staleness = source.ctx.config.rl.max_staleness
        self.total = rollouts_to_train(source.ctx.config, source.reuse)
        self.link = peer_link(source.ctx.mesh, source.rollout_mesh)
        self.submitted = 0  # rollouts taken (for the checkpoint's record)
        self._started = False  # the first version (and the rest) has been sent
        self._waiting = True  # the rollout side waits for a control document

    def take(self, index: int, policy: tuple) -> tuple[Produced, dict]:
        """Send version ``index`` (``policy``: graphdef, params, rest of the train state after
        ``index`` rollouts trained) and receive rollout ``index`` with the pipeline's
        metrics."""
        _, params, rest = policy
        control: dict = {"version": index}
        if not self._started:
            source = self.source
            control.update(
                key=np.asarray(source._base_key).astype(np.uint32).tolist(),
                position=[source.epoch, source.cursor], rollouts=self.total,
                params=paths_hash(params),
            )
        start = time.perf_counter()
        send_doc(self.link, control)  # returns once the rollout side asks for the version
        ready = time.perf_counter()
        tree = {"params": jax.tree.leaves(params)}
        if not self._started:
            tree["rest"] = jax.tree.leaves(rest)
        stats = self.link.send(tree)
        self._started = True
        sent = time.perf_counter()
        doc = recv_doc(self.link)
        like = {name: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
                for name, (shape, dtype) in doc["arrays"].items()}
        arrays = {name: _host(x) for name, x in self.link.recv(like).items()}
        done = time.perf_counter()
        if doc["index"] != index:
            raise RuntimeError(f"asked the rollout side for rollout {index}, got {doc['index']}")
        self.submitted = index + 1
        self._waiting = index + 1 < self.total
        self.source.epoch, self.source.cursor = doc["position"]
        produced = Produced.with_arrays(index, doc["version"], arrays, doc["metrics"],
                                        doc["log_rows"])
        return produced, take_metrics(index, produced, stats.nbytes, stats.seconds,
                                      (ready - start) + (done - sent), doc["idle_s"])

    def finished(self) -> list[Produced]:
        """Rollouts sampled ahead live in the rollout process: a checkpoint holds none."""
        return []

    def restore(self, produced: list[Produced], submitted: int) -> None:
        if produced:
            log.warning("dropping %d rollouts queued by a single-process checkpoint: the "
                        "rollout process samples them again", len(produced))

    def close(self) -> None:
        """Tell the rollout side to stop if it still waits for a version."""
        if not self._waiting:
            return
        self._waiting = False
        try:
            send_doc(self.link, {"stop": True})
        except Exception as error:  # noqa: BLE001  a desynchronized link: the peer raises too
            log.warning("could not tell the rollout process to stop: %s", error)


class RolloutServer:
    """The rollout side's loop (see the module docstring): receives versions, produces
    rollouts with ``source._produce`` on the schedule and sends them to the trainer.

    ``params_like`` / ``rest_like``: the policy's trainable and other variables as abstract
    trees whose leaves carry their target sharding on this side's mesh; ``graphdef`` the
    policy's. ``on_rollout(index, version, params)`` is called after each rollout is sent
    (for a record of what sampled it)."""

    def __init__(self, link, source, graphdef, params_like, rest_like,
                 on_rollout: Callable[[int, int, object], None] | None = None):
        self.link, self.source, self.graphdef = link, source, graphdef
        self.params_like, self.rest_like = params_like, rest_like
        self.max_staleness = source.ctx.config.rl.max_staleness
        self.on_rollout = on_rollout
        self.sent = 0  # rollouts sent
        self.stopped = False  # the trainer stopped before the run's last rollout
        self.start = None  # the first rollout of this launch
        self.total = 0  # rollouts the run trains in all (the first control says)
        self._versions: dict[int, tuple] = {}
        self._next_version = 0
        self._rest = None
        self._idle = 0.0

    def _receive_version(self) -> bool:
        """Receive the next version (its control document, then its weights); False at a
        stop document."""
        waited = time.perf_counter()
        control = recv_doc(self.link)
        if control.get("stop"):
            self.stopped = True
            return False
        version = int(control["version"])
        first = self.start is None
        if first:
            self._begin(control)
        elif version != self._next_version:
            raise RuntimeError(f"expected policy version {self._next_version}, got {version}")
        like = {"params": jax.tree.leaves(self.params_like)}
        if first:
            like["rest"] = jax.tree.leaves(self.rest_like)
        tree = self.link.recv(like)
        if first:
            self._rest = jax.tree.unflatten(jax.tree.structure(self.rest_like), tree["rest"])
        params = jax.tree.unflatten(jax.tree.structure(self.params_like), tree["params"])
        self._versions[version] = (self.graphdef, params, self._rest)
        self._next_version = version + 1
        self._idle += time.perf_counter() - waited
        return True

    def _begin(self, control: dict) -> None:
        if control["params"] != paths_hash(self.params_like):
            raise RuntimeError("the trainer's params flatten differently from this side's "
                               "policy (another model or LoRA setting?)")
        source = self.source
        source._base_key = np.asarray(control["key"], np.uint32)
        source.epoch, source.cursor = control["position"]
        self.start = self._next_version = int(control["version"])
        self.total = int(control["rollouts"])

    def run(self) -> int:
        """Serve until the run's last rollout is sent or the trainer stops; returns the
        number of rollouts sent."""
        if not self._receive_version():
            return 0
        k = self.max_staleness
        for i in range(self.start, self.total):
            version = max(self.start, i - k)
            while version not in self._versions:  # k = 0: version i comes first
                if not self._receive_version():
                    return self.sent
            produced = self.source._produce(i, version, self._versions[version])
            while self._next_version <= i:  # the trainer sends version i, then asks for i
                if not self._receive_version():
                    return self.sent
            self._send(produced)
            if self.on_rollout is not None:
                self.on_rollout(i, version, self._versions[version][1])
            for v in [v for v in self._versions if v < i + 1 - k]:
                del self._versions[v]
        return self.sent

    def _send(self, produced: Produced) -> None:
        arrays = {name: np.asarray(x) for name, x in produced.arrays().items()}
        doc = {
            "index": produced.index, "version": produced.version,
            "metrics": produced.metrics, "log_rows": produced.log_rows,
            "position": [self.source.epoch, self.source.cursor], "idle_s": self._idle,
            "arrays": {name: [list(x.shape), x.dtype.name] for name, x in arrays.items()},
        }
        self._idle = 0.0
        send_doc(self.link, doc)
        self.link.send(arrays)
        self.sent += 1
