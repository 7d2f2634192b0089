"""Where an RL run's two sides live: colocated (the train mesh samples too) or split
(``rl.train_devices`` / ``rl.rollout_devices``: the train step on one set of devices, the
rollout engine on the other, each with its own mesh).

``split_devices`` cuts the device list, ``run_spec.run_mesh`` builds the train mesh over the
train part and ``rollout_mesh`` the rollout mesh over the rest (``rl.rollout_mesh`` axis
sizes, data-parallel by default: every rollout device holds the whole policy and decodes
its own rows).
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxpt.config import ConfigError


def is_split(config) -> bool:
    rl = config.rl
    return rl.train_devices is not None or rl.rollout_devices is not None


def split_devices(config, devices: Sequence) -> tuple[list, list] | None:
    """(train devices, rollout devices) of a split run over ``devices`` (in order), or None
    when the two sides share every device. A ConfigError names the key that does not fit."""
    if not is_split(config):
        return None
    devices = list(devices)
    rl = config.rl
    train = _pick(rl.train_devices, devices, "rl.train_devices", from_end=False)
    rollout = _pick(rl.rollout_devices, devices, "rl.rollout_devices", from_end=True)
    if train is None:
        train = [d for d in devices if d not in rollout]
    if rollout is None:
        rollout = [d for d in devices if d not in train]
    if not train or not rollout:
        side = "rl.train_devices" if not train else "rl.rollout_devices"
        raise ConfigError(
            f"config key {side!r} leaves no devices (of {len(devices)}) for its side"
        )
    overlap = {d.id for d in train} & {d.id for d in rollout}
    if overlap:
        raise ConfigError(
            "config keys 'rl.train_devices' and 'rl.rollout_devices' share devices "
            f"{sorted(overlap)}: a split run puts each side on its own devices"
        )
    return train, rollout


def _pick(value, devices: list, key: str, *, from_end: bool) -> list | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise ConfigError(f"config key {key!r} must be a device count or a list of device "
                          f"ids, got {value!r}")
    if isinstance(value, int):
        if not 0 < value < len(devices):
            raise ConfigError(
                f"config key {key!r} ({value}) must be between 1 and {len(devices) - 1}: "
                f"the run has {len(devices)} devices and each side needs at least one"
            )
        return devices[-value:] if from_end else devices[:value]
    by_id = {d.id: d for d in devices}
    unknown = [i for i in value if not isinstance(i, int) or i not in by_id]
    if unknown or len(set(value)) != len(value):
        raise ConfigError(
            f"config key {key!r} names devices {unknown or list(value)} that are not "
            f"distinct ids of this run's devices {sorted(by_id)}"
        )
    return [by_id[i] for i in value]


def rollout_mesh(config, devices: Sequence | None = None):
    """The rollout side's mesh of a split run over ``devices`` (default: every device), or
    None when colocated."""
    import jax

    from jaxpt.sharding import make_mesh

    split = split_devices(config, devices if devices is not None else jax.devices())
    if split is None:
        return None
    shape = {"data": -1, **(config.rl.rollout_mesh or {})}
    if any(v == -1 for k, v in shape.items() if k != "data"):
        shape.pop("data")
    try:
        return make_mesh(shape, devices=split[1])
    except ValueError as error:
        raise ConfigError(f"config key 'rl.rollout_mesh': {error}") from None


def train_devices(config, devices: Sequence) -> list:
    """The devices the train mesh spans: all of ``devices`` unless the run is split."""
    split = split_devices(config, devices)
    return list(devices) if split is None else split[0]


def process_sides(config, devices: Sequence | None = None) -> tuple[set, set] | None:
    """(train process indices, rollout process indices) of a split run whose two sides live
    in different processes (``jax.distributed``: one side samples, the other trains, and
    weights and batches cross with ``jaxpt.tasks.rl.transport.PeerLink``), or None when
    every process runs both sides or the run is not split. A ConfigError when a process
    holds devices of both sides, when process 0 (which writes the run's metrics,
    completions and exports) does not train, or for a task other than GRPO."""
    import jax

    devices = list(devices if devices is not None else jax.devices())
    if len({d.process_index for d in devices}) < 2:
        return None
    split = split_devices(config, devices)
    if split is None:
        return None
    train = {d.process_index for d in split[0]}
    rollout = {d.process_index for d in split[1]}
    both = sorted(train & rollout)
    if both:
        raise ConfigError(
            f"config keys 'rl.train_devices' and 'rl.rollout_devices' give processes {both} "
            "devices of both sides: in a multi-process run each process's devices must all "
            "train or all sample (list whole processes' devices on each side)"
        )
    idle = sorted({d.process_index for d in devices} - train - rollout)
    if idle:
        raise ConfigError(
            f"config keys 'rl.train_devices' and 'rl.rollout_devices' leave processes {idle} "
            "without a side: in a multi-process run every process trains or samples"
        )
    if config.task != "grpo":  # PPO's policy is part of a model the rollout side lacks
        raise ConfigError(
            "config keys 'rl.train_devices' and 'rl.rollout_devices' put the two sides on "
            f"different processes, which the grpo task supports, not {config.task!r}: put "
            "both sides' devices on every process"
        )
    if 0 not in train:
        raise ConfigError(
            "config key 'rl.train_devices' must include process 0's devices: process 0 "
            "writes the run's metrics, completions and exports, so it trains (put the "
            "rollout side on the other processes)"
        )
    return train, rollout


def process_role(config) -> str | None:
    """``"train"`` or ``"rollout"``: this process's side of a run split across processes
    (``process_sides``), or None when it runs both (or the run is not split)."""
    import jax

    sides = process_sides(config)
    if sides is None:
        return None
    return "train" if jax.process_index() in sides[0] else "rollout"
