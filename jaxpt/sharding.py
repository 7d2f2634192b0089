"""Meshes and the one table that maps logical axis names to mesh axes.

Models name logical axes only (``embed``, ``vocab``, ``heads``, ...). ``LOGICAL_RULES``
maps each to zero or more mesh axes of the ``(data, fsdp, expert, tensor)`` mesh; a config may
override entries (``mesh.rules``): a run installs its table with ``use_rules``, and every
sharding in jaxpt (parameters, activation constraints, batches, the sampler's cache) is
derived here from the active table.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Slowest links first: data crosses hosts/slices, tensor (reduced in every layer) is the
# innermost; expert (an all-to-all per MoE layer) sits next to it.
MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (str), several mesh axes (tuple), or None (replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # Tokens are data-parallel over the expert shards too: outside the MoE blocks an expert
    # shard is one more data replica, inside them tokens travel to their experts' shards.
    # expert first: the MoE block's shard_map splits tokens over it as the major factor, so
    # entering and leaving the block re-lays nothing out (last, it costs permutes).
    "batch": ("expert", "data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "cache_seq": None,
    "layers": None,  # the stacked decoder layers' leading axis (scanned over, never split)
    "expert": "expert",  # MoE experts' stacked axis (jaxpt.models.moe: expert parallelism)
}


def make_mesh(
    shape: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
    *,
    dcn_data: int | None = None,
) -> Mesh:
    """Build a mesh with axes ``(data, fsdp, expert, tensor)``.

    ``shape`` maps axis names to sizes; one size may be -1 to take the remaining devices.
    Missing axes get size 1. The default puts every device on ``fsdp``. Axis types are
    always Auto: the compiler propagates shardings and we constrain activations by hand.
    Devices spanning several hosts or TPU slices are laid out by ``device_grid``
    (``dcn_data``: how many slices the data axis spans).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"fsdp": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {shape} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available"
        )
    grid = device_grid(sizes, devices, dcn_data=dcn_data)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _slice_index(device) -> int | None:
    return getattr(device, "slice_index", None)


def device_grid(
    sizes: Sequence[int], devices: Sequence, *, dcn_data: int | None = None
) -> np.ndarray:
    """The ``MESH_AXES``-shaped array of ``devices`` for a mesh of ``sizes`` (one size per
    axis, data first).

    Several TPU slices: the data axis crosses the slow links between slices (DCN),
    ``dcn_data`` of them (default: all), the remaining slice factor going to fsdp; inside a
    slice the layout follows the ICI topology. Several processes of one slice or on GPU/CPU
    hosts: each process's devices are one block of the data axis, so gradient reductions
    over fsdp and tensor stay inside a host whenever ``data`` is a multiple of the process
    count (otherwise the processes are spread over data, then fsdp, in process order).
    """
    sizes = [int(s) for s in sizes]
    devices = list(devices)
    slices = sorted({_slice_index(d) for d in devices} - {None})
    if len(slices) > 1:
        dcn_data = len(slices) if dcn_data is None else int(dcn_data)
        if len(slices) % dcn_data or sizes[0] % dcn_data:
            raise ValueError(
                f"mesh.dcn_data={dcn_data} must divide both the {len(slices)} TPU slices and "
                f"the data axis ({sizes[0]})"
            )
        dcn = [dcn_data, len(slices) // dcn_data] + [1] * (len(sizes) - 2)
        if sizes[1] % dcn[1]:
            raise ValueError(
                f"{len(slices)} TPU slices with mesh.dcn_data={dcn_data} put {dcn[1]} slices "
                f"on fsdp, which does not divide fsdp={sizes[1]}"
            )
        ici = [size // parts for size, parts in zip(sizes, dcn)]
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    if dcn_data not in (None, 1):
        raise ValueError(f"mesh.dcn_data={dcn_data} needs devices in several TPU slices")
    processes = sorted({d.process_index for d in devices})
    if len(processes) > 1 and devices[0].platform != "tpu":
        per_process = len(devices) // len(processes)
        even = all(
            sum(d.process_index == p for d in devices) == per_process for p in processes
        )
        if even and sizes[0] % len(processes) == 0:
            ici = [sizes[0] // len(processes), *sizes[1:]]
            return mesh_utils.create_hybrid_device_mesh(
                ici, [len(processes)] + [1] * (len(sizes) - 1), devices, process_is_granule=True
            )
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
        return np.array(ordered).reshape(sizes)
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        # create_device_mesh orders devices for the physical topology (TPU ICI rings, which
        # span the hosts of one slice).
        return mesh_utils.create_device_mesh(sizes, devices)
    return np.array(devices).reshape(sizes)


_ACTIVE_RULES: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "jaxpt_logical_rules", default=None
)


@contextlib.contextmanager
def use_rules(rules: Mapping[str, object] | None) -> Iterator[dict]:
    """Make ``rules`` (a full table, e.g. from ``merged_rules``) the active logical-axis
    table in this context: what ``constrain``, ``batch_sharding`` and every other helper
    here use when given no explicit rules. None keeps ``LOGICAL_RULES``."""
    table = dict(LOGICAL_RULES if rules is None else rules)
    token = _ACTIVE_RULES.set(table)
    try:
        yield table
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules() -> dict:
    """The logical-axis table in effect (``use_rules``), else ``LOGICAL_RULES``."""
    rules = _ACTIVE_RULES.get()
    return LOGICAL_RULES if rules is None else rules


def rules_key(rules: Mapping[str, object] | None = None) -> tuple:
    """A hashable form of a rules table (default: the active one), for jit static args:
    a program traced under one table is never reused under another."""
    rules = active_rules() if rules is None else rules
    return tuple(sorted(rules.items()))


def merged_rules(overrides: Mapping[str, object] | None = None) -> dict:
    """``LOGICAL_RULES`` with a config's overrides applied (lists become tuples)."""
    rules = dict(LOGICAL_RULES)
    for key, value in (overrides or {}).items():
        rules[key] = tuple(value) if isinstance(value, list) else value
    return rules


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Mapping[str, object] | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axes.

    With ``shape`` and ``mesh`` given, a dimension that the mapped mesh axes do not divide
    is replicated instead, and a mesh axis is used at most once per array.
    """
    rules = active_rules() if rules is None else rules
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], shape=None, rules=None
) -> NamedSharding:
    """NamedSharding on ``mesh`` for an array with the given logical axes."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def current_mesh():
    """The mesh set with ``jax.set_mesh``, or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding under the current mesh; a no-op without one."""
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding for a batch array: leading axis over the active rules' ``batch`` axes, the
    rest replicated."""
    return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1))


def process_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
    """The rows of a ``[global_rows, ...]`` batch that this process's devices hold under
    ``batch_sharding``, ascending: what ``jax.make_array_from_process_local_data`` expects
    as this process's data (all rows where the batch is not split across processes)."""
    sharding = batch_sharding(mesh, 1)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_rows,)).values():
        rows.update(range(*index[0].indices(global_rows)))
    return np.array(sorted(rows), dtype=np.int64)


def batch_shards(mesh) -> int:
    """How many ways the active rules split a batch's leading axis on ``mesh``."""
    if mesh is None:
        return 1
    target = active_rules().get("batch")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)
