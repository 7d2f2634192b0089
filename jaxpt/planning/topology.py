"""Target machines for ahead-of-time compilation: a TPU slice described by name (no TPU
needed, only ``libtpu``) or an N-device CPU mesh, with each device's memory."""

from __future__ import annotations

import dataclasses
import os
import re

GIB = 1024**3

# HBM per chip, GiB (public TPU system specs).
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Bidirectional inter-chip interconnect (ICI) bandwidth per chip, GB/s (the Cloud TPU
# system architecture pages; v4's page gives none). Plans of split RL runs estimate the
# weight sync's time from it.
TPU_ICI_GBPS = {"v5e": 400, "v5p": 1200, "v6e": 800}

_SPEC = re.compile(r"^(?P<kind>[a-z0-9]+):(?P<shape>[0-9x]+)$")


class TopologyError(ValueError):
    """A topology name jaxpt cannot build devices for."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """Devices to compile for and the memory each one has."""

    name: str  # as given, e.g. "v5e:2x4" or "cpu:8"
    platform: str  # "tpu" | "cpu"
    devices: tuple
    hbm_bytes: int  # per device
    # One direction of a chip's ICI links together, bytes/s (half the bidirectional
    # figure); None where unknown (CPU, v4).
    ici_bytes_per_s: float | None = None

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def device_kind(self) -> str:
        return str(self.devices[0].device_kind)


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_spec(spec: str) -> tuple[str, tuple[int, ...]]:
    """``"v5e:2x4"`` -> ``("v5e", (2, 4))``; ``"cpu:8"`` -> ``("cpu", (8,))``."""
    match = _SPEC.match(spec.strip().lower())
    if not match:
        raise TopologyError(
            f"topology {spec!r} is not KIND:SHAPE (e.g. v5e:2x4, v5p:2x2x2, v6e:4x4, cpu:8)"
        )
    kind = match["kind"]
    shape = tuple(int(s) for s in match["shape"].split("x") if s)
    if kind != "cpu" and kind not in TPU_HBM_GIB:
        known = ", ".join(sorted(TPU_HBM_GIB) + ["cpu"])
        raise TopologyError(f"topology {spec!r}: unknown kind {kind!r}; known: {known}")
    if not shape or min(shape) < 1 or (kind == "cpu" and len(shape) != 1):
        raise TopologyError(f"topology {spec!r}: bad shape {match['shape']!r}")
    return kind, shape


def cpu_device_flag(spec: str) -> str | None:
    """The XLA flag that gives a ``cpu:N`` topology its N host devices (None otherwise);
    it must be in ``XLA_FLAGS`` before jax starts its CPU backend."""
    kind, shape = parse_spec(spec)
    return f"--xla_force_host_platform_device_count={shape[0]}" if kind == "cpu" else None


def get_topology(spec: str, hbm_gib: float | None = None) -> Topology:
    """Devices for ``spec``: TPU devices from ``libtpu``'s topology description (compile
    only, nothing runs), or the first N CPU devices of this process. ``hbm_gib`` overrides
    the per-device memory (CPU default: host RAM / N)."""
    import jax

    kind, shape = parse_spec(spec)
    n = 1
    for s in shape:
        n *= s
    if kind == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise TopologyError(
                f"topology {spec!r} needs {n} CPU devices but this process has "
                f"{len(devices)}; set XLA_FLAGS={cpu_device_flag(spec)} before jax starts"
            )
        memory = _host_memory_bytes() // n
        devices = tuple(devices[:n])
    else:
        devices = tuple(_tpu_devices(kind, shape, spec))
        memory = TPU_HBM_GIB[kind] * GIB
    if hbm_gib is not None:
        memory = int(hbm_gib * GIB)
    ici = TPU_ICI_GBPS.get(kind)
    return Topology(spec, "cpu" if kind == "cpu" else "tpu", devices, memory,
                    None if ici is None else ici * 1e9 / 2)


def libtpu_available() -> bool:
    """Whether TPU topologies can be described here (``pip install jaxpt[tpu]``)."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def _tpu_devices(kind: str, shape: tuple[int, ...], spec: str) -> list:
    if not libtpu_available():
        raise TopologyError(
            f"topology {spec!r} needs libtpu to describe TPU devices: "
            "pip install 'jaxpt[tpu]' (or 'jax[tpu]' at the installed jax version)"
        )
    from jax.experimental import topologies

    # Off a TPU VM libtpu cannot discover its host; these keep it quiet.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Describing a topology runs nothing: other jax processes may hold libtpu meanwhile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    name = f"{kind}:{'x'.join(str(s) for s in shape)}"
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except (RuntimeError, ValueError) as error:  # libtpu: XlaRuntimeError, its own message
        raise TopologyError(f"topology {spec!r}: libtpu cannot describe it: {error}") from None
    return list(description.devices)
