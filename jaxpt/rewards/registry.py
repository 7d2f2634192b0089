"""Reward functions by name, so a YAML config can pick them: built-ins or any importable callable.

A config lists specs, each a name or a mapping:

    rewards:
      - math                                  # built-in, weight 1.0
      - {name: format, weight: 0.1}
      - {name: code, weight: 1.0, kwargs: {timeout_s: 2.0, memory_mb: 256}}
      - {name: boxed, fn: format, weight: 0.1, kwargs: {pattern: 'boxed'}}
      - {fn: "my_pkg.rewards:length_penalty", weight: 0.01}

or a mapping from name to weight (or to the rest of a spec): `{math: 1.0, format: 0.1}`.
"""

import functools
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxpt.rewards.arithmetic import worked_steps_reward
from jaxpt.rewards.code import code_reward
from jaxpt.rewards.format import format_reward
from jaxpt.rewards.math import last_number_reward, math_reward
from jaxpt.rewards.reasoning_gym import reasoning_gym_reward
from jaxpt.rewards.runner import RewardFn

BUILTIN_REWARDS: dict[str, Callable[..., Any]] = {
    "math": math_reward,
    "accuracy": math_reward,  # TRL's name for the same check
    "last_number": last_number_reward,
    "worked_steps": worked_steps_reward,
    "format": format_reward,
    "code": code_reward,
    "reasoning_gym": reasoning_gym_reward,
}

_SPEC_KEYS = {"name", "fn", "weight", "kwargs"}


def resolve_reward_fn(ref: str | Callable[..., Any]) -> Callable[..., Any]:
    """A built-in name, `"package.module:function"`, `"package.module.function"`, or a callable."""
    if callable(ref):
        return ref
    if ref in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[ref]
    if ":" in ref:
        module_name, attr_path = ref.split(":", 1)
        fn = _get_attr_path(importlib.import_module(module_name), attr_path, ref)
    elif "." in ref:
        fn = _import_dotted(ref)
    else:
        raise ValueError(
            f"unknown reward function {ref!r}: use one of {sorted(BUILTIN_REWARDS)} "
            "or an import path like 'package.module:function'"
        )
    if not callable(fn):
        raise TypeError(f"reward function {ref!r} resolved to a non-callable {type(fn).__name__}")
    return fn


def build_reward_fns(specs: Sequence[Any] | Mapping[str, Any]) -> list[RewardFn]:
    """(name, fn, weight) triples for `RewardRunner` from config specs (see module docstring)."""
    if isinstance(specs, Mapping):
        specs = [_mapping_entry(name, value) for name, value in specs.items()]
    return [_build_one(spec) for spec in specs]


def _mapping_entry(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {"name": name, **value}
    return {"name": name, "weight": value}


def _build_one(spec: Any) -> RewardFn:
    if isinstance(spec, str) or callable(spec):
        spec = {"fn": spec}
    if not isinstance(spec, Mapping):
        raise TypeError(f"a reward spec is a name or a mapping, got {spec!r}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in reward spec {dict(spec)}")
    ref = spec.get("fn", spec.get("name"))
    if ref is None:
        raise ValueError(f"reward spec {dict(spec)} needs 'fn' or 'name'")
    fn = resolve_reward_fn(ref)
    kwargs = dict(spec.get("kwargs") or {})
    if kwargs:
        fn = functools.partial(fn, **kwargs)
    weight = float(spec.get("weight", 1.0))
    if not math.isfinite(weight):
        raise ValueError(f"reward weight must be finite, got {weight}")
    return RewardFn(spec.get("name") or _default_name(ref), fn, weight)


def _default_name(ref: str | Callable[..., Any]) -> str:
    if callable(ref):
        return getattr(ref, "__name__", type(ref).__name__)
    if ref in BUILTIN_REWARDS:
        return ref
    return ref.replace(":", ".").rsplit(".", 1)[-1]


def _import_dotted(ref: str) -> Any:
    """Import the longest module prefix of `ref`, then walk the remaining attributes."""
    parts = ref.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing prefix means "try a shorter one"; a broken import must surface.
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            continue
        return _get_attr_path(module, ".".join(parts[split:]), ref)
    raise ImportError(f"no module found for reward function {ref!r}")


def _get_attr_path(obj: Any, attr_path: str, ref: str) -> Any:
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ImportError(f"cannot resolve reward function {ref!r}: no {attr!r}") from None
    return obj
