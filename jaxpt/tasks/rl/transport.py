"""Moving pytrees between the rollout and train processes of an asynchronous RL run.

In a multi-process run (``jax.distributed``) the rollout side and the train side each hold
their own devices and run their own programs on process-local meshes. ``PeerLink`` moves a
pytree from one side's devices to the other's with one jitted collective over the union
of both device sets: each leaf becomes a global array over a ``(peer_link, *receiver
axes)`` mesh (the sender's shards its real data, the receiver's a zero placeholder) and a
``shard_map``'d ``jax.lax.ppermute`` copies every sender device's shard to the receiver
device at the same mesh position. The receiver's shards are then reassembled into arrays on
its own mesh, in the target sharding: weights go device to device, never through the host,
and the copy is bit-exact (a permute, not a sum).

Why a collective: ``jax.device_put`` cannot cross processes on CPU/GPU in jax 0.10 (a
cross-host reshard needs the same device set on both ends, except on the TFRT TPU
runtime), and files or sockets of our own would bypass the runtime. ``ppermute`` over
gloo (CPU) is exact for every dtype and the fastest of the collectives we measured
(``psum`` and ``all_gather`` move the data twice).

The contract, since every process compiles and runs the same program:

- both processes build ``PeerLink(mesh_a, mesh_b)`` from the same two meshes, in the same
  order (each process can build the other's mesh from ``jax.devices()``);
- transfers are issued in the same order on both sides: whenever one side calls
  ``send``/``send_batch``, the other calls ``recv``/``recv_batch`` next;
- both sides describe the transfer identically: the receiver's ``like`` (shapes, dtypes,
  ``NamedSharding`` on the receiver's mesh) must match what the sender sends. Each
  transfer starts with a tiny handshake (16 bytes each way) that compares a hash of it,
  so a mismatch raises the same ``ValueError`` on both sides instead of aborting.

Limits: both meshes must have the same number of devices (the permute pairs them up), and
each process's devices lie on one side only (one controller cannot both send and receive:
in a single process, move the tree with ``jax.device_put``). A call that fails on one side
before its handshake (a bad ``like``) leaves the other side waiting in its collective.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PEER_AXIS = "peer_link"  # the union mesh's leading axis: 0 = mesh_a's devices, 1 = mesh_b's
_HASH_WORDS = 4  # a signature hash travels as uint32[4] (128 bits)


@dataclasses.dataclass(frozen=True)
class TransferStats:
    """One transfer as this process saw it: ``direction`` ("a->b" or "b->a"), the payload
    (``nbytes``, summed over leaves, each counted once), the wall time of the call
    (``seconds``, staging and the collective, waited on) and whether it built a new
    program (``compiled``: the first transfer of a signature)."""

    direction: str
    nbytes: int
    seconds: float
    compiled: bool

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 2**20 / max(self.seconds, 1e-9)


@dataclasses.dataclass
class _Program:
    compiled: Any  # jax.stages.Compiled: called with the global arrays, never recompiled
    union: list[NamedSharding]  # each leaf's sharding over the union mesh
    placeholders: Any  # receiver side: jitted zeros in the target shardings


class PeerLink:
    """A point-to-point link between two disjoint meshes of equal size (the rollout side's
    and the train side's), each held by processes of its own.

    ``send(tree, like)`` on one side and ``recv(like)`` on the other move ``tree`` onto
    the receiver's devices; ``send_batch``/``recv_batch`` do the same for a host batch (a
    dict of numpy arrays plus float metrics). Every call blocks until its collective is
    done and records a ``TransferStats`` in ``last`` (totals in ``total_bytes`` and
    ``total_seconds``). Each transfer signature (tree structure, shapes, dtypes, target
    specs, direction) is compiled once; later transfers reuse the compiled program.
    Leaves whose per-device block is under ``bucket_bytes`` are packed, per dtype, into
    flat buckets of at most that size, one collective per bucket (larger leaves go alone):
    this bounds both the collective count and the packing buffers' extra memory.
    """

    def __init__(self, mesh_a: Mesh, mesh_b: Mesh, *, bucket_bytes: int = 4 << 20):
        devices_a, devices_b = list(mesh_a.devices.flat), list(mesh_b.devices.flat)
        ids_a, ids_b = {d.id for d in devices_a}, {d.id for d in devices_b}
        if ids_a & ids_b:
            raise ValueError(f"the two meshes share devices {sorted(ids_a & ids_b)}")
        if len(devices_a) != len(devices_b):
            raise ValueError(
                f"PeerLink pairs devices one to one: mesh_a has {len(devices_a)} devices, "
                f"mesh_b {len(devices_b)}; give both sides meshes of the same size"
            )
        for mesh in (mesh_a, mesh_b):
            if PEER_AXIS in mesh.axis_names:
                raise ValueError(f"mesh axis name {PEER_AXIS!r} is reserved by PeerLink")
        mine = {d.id for d in jax.local_devices()}
        in_a, in_b = bool(mine & ids_a), bool(mine & ids_b)
        if in_a == in_b:
            raise ValueError(
                "this process must hold devices of exactly one side of a PeerLink "
                f"(its devices {sorted(mine)}; mesh_a {sorted(ids_a)}, mesh_b "
                f"{sorted(ids_b)}); within one process use jax.device_put"
            )
        self.meshes = (mesh_a, mesh_b)
        self.bucket_bytes = int(bucket_bytes)
        self.side = 0 if in_a else 1  # this process's side: 0 = mesh_a, 1 = mesh_b
        self.mesh = self.meshes[self.side]
        self.peer_mesh = self.meshes[1 - self.side]
        self._programs: dict[bytes, _Program] = {}
        self._handshakes: dict[int, Any] = {}
        self.last: TransferStats | None = None
        self.total_bytes = 0
        self.total_seconds = 0.0

    # ------------------------------------------------------------------ public API

    def send(self, tree, like=None) -> TransferStats:
        """Send ``tree`` (jax Arrays on this side's mesh, or numpy arrays) to the other side,
        which calls ``recv`` with the same ``like`` at the same point.

        ``like``: the receiver's layout, a pytree of ``jax.ShapeDtypeStruct``/arrays whose
        ``sharding`` is a ``NamedSharding`` on the *receiver's* mesh (None: replicated).
        Default: the tree's own shapes, dtypes and partition specs, placed on the
        receiver's mesh (so its axis names must exist there). Each leaf is first laid out
        here like its target (a local reshard when the specs differ)."""
        if like is None:
            like = jax.tree.map(self._like_of_own, tree)
        return self._transfer(1 - self.side, tree, like, ())[1]

    def recv(self, like):
        """Receive the tree the other side ``send``s: arrays shaped and typed like ``like``,
        on this side's devices in ``like``'s shardings (a ``NamedSharding`` on this side's
        mesh per leaf, or None for replicated)."""
        return self._transfer(self.side, None, like, ())[0]

    def send_batch(self, batch: Mapping[str, np.ndarray], metrics: Mapping[str, float],
                   like: Mapping[str, Any]) -> TransferStats:
        """Send a rollout's train batch from the host: ``batch`` a dict of fixed-shape numpy
        arrays (``like`` gives the receiver's shardings, as for ``send``), ``metrics`` a
        dict of floats whose keys the receiver names too. The metrics travel as the bits of
        float64, so they arrive exact. The arrays go host -> this side's devices ->
        the receiver's devices."""
        arrays = {key: np.asarray(batch[key]) for key in like}
        tree = {"arrays": arrays, "metrics": _encode_metrics(metrics)}
        receiver = 1 - self.side
        return self._transfer(receiver, tree, self._batch_like(receiver, like, len(metrics)),
                              tuple(sorted(metrics)))[1]

    def recv_batch(self, like: Mapping[str, Any], metric_keys: Sequence[str]
                   ) -> tuple[dict[str, jax.Array], dict[str, float]]:
        """Receive what the other side ``send_batch``es: the arrays on this side's devices
        in ``like``'s shardings, and the metrics (``metric_keys``: the sender's keys, in
        any order) as Python floats."""
        keys = tuple(sorted(metric_keys))
        out = self._transfer(self.side, None, self._batch_like(self.side, like, len(keys)),
                             keys)[0]
        return out["arrays"], _decode_metrics(keys, out["metrics"])

    # --------------------------------------------------------------- the mechanism

    def _like_of_own(self, leaf) -> jax.ShapeDtypeStruct:
        sharding = getattr(leaf, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
        return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype,
                                    sharding=NamedSharding(self.peer_mesh, spec))

    def _batch_like(self, receiver: int, like: Mapping[str, Any], num_metrics: int) -> dict:
        replicated = NamedSharding(self.meshes[receiver], PartitionSpec())
        metrics = jax.ShapeDtypeStruct((max(num_metrics, 1), 2), np.uint32, sharding=replicated)
        return {"arrays": dict(like), "metrics": metrics}

    def _union_mesh(self, receiver: int) -> Mesh:
        """Both sides' devices, each laid out in the receiver mesh's shape, stacked on a
        leading ``PEER_AXIS`` (mesh_a first)."""
        target = self.meshes[receiver]
        grids = [np.asarray(m.devices).reshape(target.devices.shape) for m in self.meshes]
        return Mesh(np.stack(grids), (PEER_AXIS, *target.axis_names))

    def _specs(self, receiver: int, like) -> list[tuple[tuple, Any, PartitionSpec]]:
        target = self.meshes[receiver]
        out = []
        for leaf in jax.tree.leaves(like):
            sharding = getattr(leaf, "sharding", None)
            if sharding is None:
                spec = PartitionSpec()
            elif isinstance(sharding, NamedSharding) and _same_mesh(sharding.mesh, target):
                spec = sharding.spec
            else:
                raise ValueError(
                    f"each like leaf's sharding must be a NamedSharding on the receiver's mesh "
                    f"{target.shape} (devices {[d.id for d in target.devices.flat]}); got "
                    f"{sharding}"
                )
            out.append((tuple(leaf.shape), np.dtype(leaf.dtype), spec))
        return out

    def _signature(self, receiver: int, like, extra: tuple) -> bytes:
        """A 128-bit hash of everything both sides must agree on for one transfer."""
        specs = self._specs(receiver, like)
        union = self._union_mesh(receiver)
        text = repr((
            "a->b" if receiver == 1 else "b->a", str(jax.tree.structure(like)),
            [(shape, dtype.str, tuple(spec)) for shape, dtype, spec in specs],
            union.axis_names, union.devices.shape, [d.id for d in union.devices.flat], extra,
        ))
        return hashlib.blake2b(text.encode(), digest_size=4 * _HASH_WORDS).digest()

    def _transfer(self, receiver: int, tree, like, extra: tuple):
        start = time.perf_counter()
        receiving = receiver == self.side
        specs = self._specs(receiver, like)
        if not receiving:  # checked before the handshake, so no error strands the peer
            leaves, treedef = jax.tree.flatten(tree)
            if treedef != jax.tree.structure(like):
                raise ValueError(f"the tree {treedef} does not match like "
                                 f"{jax.tree.structure(like)}")
            for leaf, (shape, dtype, _) in zip(leaves, specs):
                if tuple(np.shape(leaf)) != shape or np.dtype(leaf.dtype) != dtype:
                    raise ValueError(f"leaf {np.shape(leaf)} {leaf.dtype} does not match like "
                                     f"{shape} {dtype}")
        signature = self._signature(receiver, like, extra)
        # Every transfer, not just a signature's first: one side may have the program
        # cached while the other asks for a new one, and a payload permute the two sides
        # disagree on aborts the process (gloo checks sizes) rather than raising.
        self._handshake(receiver, signature)
        program = self._programs.get(signature)
        compiled = program is None
        if compiled:
            program = self._programs[signature] = self._build(receiver, like)
        if receiving:
            local = jax.tree.leaves(program.placeholders())
        else:
            local = [self._stage(leaf, spec) for leaf, (_, _, spec) in zip(leaves, specs)]
        global_in = [
            jax.make_array_from_single_device_arrays(
                shape, union, [s.data for s in array.addressable_shards])
            for array, (shape, _, _), union in zip(local, specs, program.union)
        ]
        global_out = program.compiled(*global_in)
        jax.block_until_ready(global_out)
        result = None
        if receiving:
            target = self.meshes[receiver]
            result = jax.tree.unflatten(jax.tree.structure(like), [
                jax.make_array_from_single_device_arrays(
                    shape, NamedSharding(target, spec), [s.data for s in out.addressable_shards])
                for out, (shape, _, spec) in zip(global_out, specs)
            ])
        nbytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype, _ in specs)
        stats = TransferStats("a->b" if receiver == 1 else "b->a", nbytes,
                              time.perf_counter() - start, compiled)
        self.last = stats
        self.total_bytes += nbytes
        self.total_seconds += stats.seconds
        return result, stats

    def _stage(self, leaf, spec) -> jax.Array:
        """The sender's leaf laid out on its own devices like the receiver's target."""
        target = self.meshes[1 - self.side]
        wire = Mesh(np.asarray(self.mesh.devices).reshape(target.devices.shape),
                    target.axis_names)
        return jax.device_put(leaf, NamedSharding(wire, spec))

    def _build(self, receiver: int, like) -> _Program:
        """Compile the permute for one signature (and the receiver's placeholders)."""
        specs = self._specs(receiver, like)
        union = self._union_mesh(receiver)
        pairs = [(1 - receiver, receiver)]
        in_specs = tuple(spec for _, _, spec in specs)
        blocks = [NamedSharding(union, spec).shard_shape(shape) for shape, _, spec in specs]
        buckets = _buckets([int(np.prod(b)) * dtype.itemsize for b, (_, dtype, _) in
                            zip(blocks, specs)], [dtype for _, dtype, _ in specs],
                           self.bucket_bytes)

        def permute(*leaves):
            out = list(leaves)
            for bucket in buckets:
                if len(bucket) == 1:  # a big leaf travels as it is
                    out[bucket[0]] = jax.lax.ppermute(leaves[bucket[0]], PEER_AXIS, pairs)
                    continue
                # Small leaves of one dtype travel as one flat buffer: one collective per
                # bucket instead of one per leaf (each costs milliseconds on gloo).
                packed = jnp.concatenate([leaves[i].reshape(-1) for i in bucket])
                packed = jax.lax.ppermute(packed, PEER_AXIS, pairs)
                offset = 0
                for i in bucket:
                    size = leaves[i].size
                    out[i] = packed[offset:offset + size].reshape(leaves[i].shape)
                    offset += size
            return tuple(out)

        # Each leaf claims to be replicated over PEER_AXIS although the two sides hold
        # different data (check_vma=False): no reshape into a stacked [2, ...] array needed.
        fn = jax.shard_map(permute, mesh=union, in_specs=in_specs, out_specs=in_specs,
                           check_vma=False)
        shardings = [NamedSharding(union, spec) for spec in in_specs]
        abstract = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
                    for (shape, dtype, _), sharding in zip(specs, shardings)]
        with jax.set_mesh(union):  # whatever mesh the caller has set (the train loop's)
            compiled = jax.jit(fn, out_shardings=tuple(shardings)).lower(*abstract).compile()
        placeholders = None
        if receiver == self.side:
            target = self.meshes[receiver]
            out = tuple(NamedSharding(target, spec) for spec in in_specs)
            placeholders = jax.jit(
                lambda: tuple(jnp.zeros(shape, dtype) for shape, dtype, _ in specs),
                out_shardings=out)
        return _Program(compiled, shardings, placeholders)

    def _handshake(self, receiver: int, signature: bytes) -> None:
        """Swap signature hashes with the other side (a fixed-shape permute both ways) and
        raise on both sides if they differ."""
        program = self._handshakes.get(receiver)
        union = self._union_mesh(receiver)
        sharding = NamedSharding(union, PartitionSpec())
        if program is None:
            fn = jax.shard_map(
                lambda x: jax.lax.ppermute(x, PEER_AXIS, [(0, 1), (1, 0)]), mesh=union,
                in_specs=PartitionSpec(), out_specs=PartitionSpec(), check_vma=False)
            abstract = jax.ShapeDtypeStruct((_HASH_WORDS,), np.uint32, sharding=sharding)
            with jax.set_mesh(union):
                program = self._handshakes[receiver] = (
                    jax.jit(fn, out_shardings=sharding).lower(abstract).compile())
        words = np.frombuffer(signature, np.uint32)
        local = [jax.device_put(words, d) for d in sharding.addressable_devices]
        theirs = program(jax.make_array_from_single_device_arrays(words.shape, sharding, local))
        for shard in theirs.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), words):
                role = "receive" if receiver == self.side else "send"
                raise ValueError(
                    f"PeerLink: this side wants to {role} a tree whose signature (direction, "
                    "structure, shapes, dtypes, target specs, metric keys) differs from the "
                    "other side's; both must describe the same transfer (and one must send "
                    "while the other receives)"
                )


def _buckets(sizes: Sequence[int], dtypes: Sequence, limit: int) -> list[list[int]]:
    """Leaf indices grouped, per dtype and in order, into buckets of at most ``limit``
    bytes; a leaf of ``limit`` bytes or more is a bucket of its own."""
    buckets, open_buckets = [], {}  # dtype -> (indices, bytes) of its bucket being filled
    for i, (size, dtype) in enumerate(zip(sizes, dtypes)):
        if size >= limit:
            buckets.append([i])
            continue
        current, filled = open_buckets.get(dtype, ([], 0))
        if current and filled + size > limit:
            buckets.append(current)
            current, filled = [], 0
        open_buckets[dtype] = (current + [i], filled + size)
    return buckets + [indices for indices, _ in open_buckets.values()]


def _same_mesh(mesh: Mesh, other: Mesh) -> bool:
    return (mesh.axis_names == other.axis_names and mesh.devices.shape == other.devices.shape
            and [d.id for d in mesh.devices.flat] == [d.id for d in other.devices.flat])


def _encode_metrics(metrics: Mapping[str, float]) -> np.ndarray:
    """Float metrics, by sorted key, as the uint32 pairs of their float64 bits."""
    values = np.array([float(metrics[k]) for k in sorted(metrics)] or [0.0], np.float64)
    return values.view(np.uint32).reshape(-1, 2)


def _decode_metrics(keys: Sequence[str], words) -> dict[str, float]:
    values = np.ascontiguousarray(np.asarray(words)).view(np.float64).reshape(-1)
    return {key: float(value) for key, value in zip(keys, values)}
