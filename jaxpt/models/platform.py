"""Which platform programs are traced for: the running backend, or the one a context names
(compiling for a TPU slice from a CPU host picks what the TPU run would)."""

from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jaxpt_attention_platform", default=None
)


@contextlib.contextmanager
def attention_platform(platform: str | None):
    """Resolve ``auto`` attention as on ``platform`` ("cpu", "gpu", "tpu") in this context:
    compiling for a TPU slice from a CPU host picks what the TPU run would."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def target_platform() -> str:
    """The platform programs traced now will run on ("cpu", "gpu", "tpu")."""
    return _TARGET_PLATFORM.get() or jax.default_backend()
