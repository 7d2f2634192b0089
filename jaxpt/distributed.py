"""Multi-host runs on JAX's multi-controller runtime (``jax.distributed``).

Every host runs the same ``python -m jaxpt.train`` command; ``initialize_distributed``
connects the processes before any other JAX call, after which ``jax.devices()`` spans all
hosts and the run's mesh, batches and checkpoints are global. Where the processes are
described, first match wins:

1. the config's ``distributed`` section (coordinator_address, num_processes, process_id,
   local_device_ids, initialization_timeout);
2. ``JAXPT_COORDINATOR_ADDRESS``, ``JAXPT_NUM_PROCESSES``, ``JAXPT_PROCESS_ID`` (and
   ``JAXPT_LOCAL_DEVICE_IDS``, comma-separated);
3. a cluster JAX detects by itself: a multi-host Cloud TPU VM or multi-slice TPU
   (``TPU_WORKER_HOSTNAMES``/``TPU_PROCESS_ADDRESSES`` naming several hosts,
   ``MEGASCALE_NUM_SLICES`` > 1), a SLURM job step with several tasks, an Open MPI job
   with several ranks. ``JAXPT_DISTRIBUTED=1`` asks JAX to detect where none of these
   variables is set (e.g. a GCE TPU VM that only its metadata server describes).

Nothing found, or one process: a no-op, so single-host runs are unchanged.

``StopVote`` makes a stop request (SIGTERM on any host) a decision every process takes at
the same step, so all of them save the same checkpoint and exit together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAXPT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXPT_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXPT_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAXPT_LOCAL_DEVICE_IDS"
ENV_AUTO = "JAXPT_DISTRIBUTED"


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _count(value: str | None) -> int:
    return len([part for part in (value or "").split(",") if part.strip()])


def cluster_detected(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``env`` (default: ``os.environ``) describes a multi-process job that
    ``jax.distributed.initialize()`` sets up with no arguments."""
    env = os.environ if env is None else env
    if env.get(ENV_AUTO, "").lower() in ("1", "true", "yes"):
        return True
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if _count(hosts) > 1 or (_env_int(env, "MEGASCALE_NUM_SLICES") or 1) > 1:
        return True
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(name in env for name in slurm) and (_env_int(env, "SLURM_NTASKS") or 1) > 1:
        return True
    return "OMPI_MCA_orte_hnp_uri" in env and (_env_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1


def distributed_args(section=None, env: Mapping[str, str] | None = None) -> dict | None:
    """Keyword arguments for ``jax.distributed.initialize`` from the config's
    ``distributed`` section and the environment (see the module docstring); ``{}`` lets JAX
    detect the cluster; None for a single-process run."""
    env = os.environ if env is None else env

    def pick(key: str, env_value):
        value = getattr(section, key, None) if section is not None else None
        return env_value if value is None else value

    ids_env = env.get(ENV_LOCAL_DEVICE_IDS)
    try:
        ids_from_env = [int(i) for i in ids_env.split(",")] if ids_env else None
    except ValueError:
        raise ValueError(
            f"environment variable {ENV_LOCAL_DEVICE_IDS} must be comma-separated integers, "
            f"got {ids_env!r}"
        ) from None
    args = {
        "coordinator_address": pick("coordinator_address", env.get(ENV_COORDINATOR) or None),
        "num_processes": pick("num_processes", _env_int(env, ENV_NUM_PROCESSES)),
        "process_id": pick("process_id", _env_int(env, ENV_PROCESS_ID)),
        "local_device_ids": pick("local_device_ids", ids_from_env),
    }
    timeout = getattr(section, "initialization_timeout", None)
    explicit = {k: v for k, v in args.items() if v is not None}
    if explicit.get("num_processes") == 1:
        return None
    if not any(k in explicit for k in ("coordinator_address", "num_processes", "process_id")):
        if not cluster_detected(env):
            return None
        explicit = {}
    else:
        missing = [k for k in ("coordinator_address", "num_processes", "process_id")
                   if k not in explicit]
        if missing and not cluster_detected(env):
            raise ValueError(
                "a multi-process run needs all of distributed.coordinator_address, "
                "distributed.num_processes and distributed.process_id (or "
                f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing: "
                + ", ".join(f"distributed.{k}" for k in missing)
            )
        n, i = explicit.get("num_processes"), explicit.get("process_id")
        if n is not None and i is not None and not 0 <= i < n:
            raise ValueError(f"distributed.process_id ({i}) must be in [0, num_processes={n})")
    if timeout is not None:
        explicit["initialization_timeout"] = int(timeout)
    return explicit


def initialize_distributed(config=None, env: Mapping[str, str] | None = None) -> bool:
    """Connect this process to the others (``jax.distributed.initialize``) when the config
    or environment describes a multi-process run; call it before any other JAX call.
    Returns whether it connected; a second call, or a single-process run, does nothing."""
    section = getattr(config, "distributed", None)
    args = distributed_args(section, env)
    if args is None or jax.distributed.is_initialized():
        return False
    log.info("connecting to the other processes (jax.distributed.initialize %s)", args or "")
    jax.distributed.initialize(**args)
    log.info("process %d of %d; %d local and %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


class StopVote:
    """Agree on a stop across processes: ``vote(requested)`` after each step starts a tiny
    all-reduce of this process's flag and returns the outcome of the previous step's vote,
    which has finished by then (reading it does not stall the device queue). Every process
    therefore sees a stop at the same step, one step after any of them asked. With one
    process it answers at once, with no collective."""

    def __init__(self, mesh: jax.sharding.Mesh):
        self.mesh = mesh
        self.multi = jax.process_count() > 1
        self.pending = None
        if self.multi:
            every_device = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
            self.sharding = every_device
            self.local = len(mesh.local_devices)
            self.reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def vote(self, requested: bool) -> bool:
        if not self.multi:
            return requested
        flags = jax.make_array_from_process_local_data(
            self.sharding, np.full((self.local,), int(requested), np.int32)
        )
        previous, self.pending = self.pending, self.reduce(flags)
        return previous is not None and bool(jax.device_get(previous))

    def settle(self) -> bool:
        """The outcome of the last vote, waiting for it (at a stop or the end)."""
        pending, self.pending = self.pending, None
        return pending is not None and bool(jax.device_get(pending))
