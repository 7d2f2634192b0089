"""What to sample and when to stop: a frozen, hashable record (a static jit argument)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; every field is static, so each distinct config compiles once.

    ``max_new_tokens`` is the length of the output buffers (a bucket); the number of steps
    actually run can be lowered per call without recompiling (``sample_arrays(limit=)``).
    ``eos_token_ids`` end a sequence (kept in the output); ``stop`` holds token sequences
    that end it too (kept as well). ``num_samples`` completions are drawn per prompt from
    one prefill. ``temperature == 0`` is greedy.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    eos_token_ids: tuple[int, ...] = ()
    stop: tuple[tuple[int, ...], ...] = ()
    num_samples: int = 1
    pad_token_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if any(len(s) == 0 for s in self.stop):
            raise ValueError("stop sequences must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def make(
        cls,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        stop: Sequence[Sequence[int]] | None = None,
        **kwargs,
    ) -> SamplingConfig:
        """Build from user-facing arguments (lists become tuples; a no-op filter is dropped)."""
        if eos_token_id is None:
            eos = ()
        elif isinstance(eos_token_id, int):
            eos = (eos_token_id,)
        else:
            eos = tuple(int(t) for t in eos_token_id)
        stop_seqs = tuple(tuple(int(t) for t in s) for s in (stop or ()))
        # Normalise filters that do nothing, so they neither cost nor recompile.
        if kwargs.get("top_p") == 1.0:
            kwargs["top_p"] = None
        if kwargs.get("min_p") == 0.0:
            kwargs["min_p"] = None
        if kwargs.get("repetition_penalty") == 1.0:
            kwargs["repetition_penalty"] = None
        if kwargs.get("temperature", 1.0) == 0:  # greedy ignores the filters
            kwargs.update(top_k=None, top_p=None, min_p=None)
        return cls(eos_token_ids=eos, stop=stop_seqs, **kwargs)
