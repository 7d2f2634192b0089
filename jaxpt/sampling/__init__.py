"""Batched, KV-cached sampling for rollouts and evaluation.

``generate(model, prompts, ...)`` is the list-in, list-out API (prompts as id lists, arrays
or tokenizer output; see ``prompt_token_lists``); ``sample_arrays(graphdef,
state, prompt_ids_bt, prompt_mask_bt, rng, config)`` is the jitted array-level entry point
for RL trainers (current weights, their mesh, no copies). ``PromptSampler`` is the one
path from prompt rows to samples and text that rollouts, rejection sampling, evals and
judges share (``jaxpt.sampling.prompts``).
"""

from jaxpt.sampling.api import (
    GenerateOutput,
    bucket,
    generate,
    left_pad,
    prompt_token_lists,
)
from jaxpt.sampling.config import SamplingConfig
from jaxpt.sampling.continuous import Engine
from jaxpt.sampling.engine import SampleArrays, sample_arrays
from jaxpt.sampling.processors import choose_tokens, sampling_logprobs
from jaxpt.sampling.prompts import PromptSampler, PromptSamples, prompt_as_seen


def trace_count() -> int:
    """How many sampling programs (static sampler and engine) have been traced, i.e.
    compiled: a count that must not grow in steady state."""
    from jaxpt.sampling import continuous, engine

    return engine.trace_count() + continuous.trace_count()


__all__ = [
    "Engine",
    "GenerateOutput",
    "PromptSampler",
    "PromptSamples",
    "SampleArrays",
    "SamplingConfig",
    "bucket",
    "choose_tokens",
    "generate",
    "left_pad",
    "prompt_as_seen",
    "prompt_token_lists",
    "sample_arrays",
    "sampling_logprobs",
    "trace_count",
]
