"""``generate``: lists of token ids in, lists of completions out, over the jitted sampler."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from jaxpt.sampling.config import SamplingConfig
from jaxpt.sampling.engine import SampleArrays, sample_arrays
from jaxpt.sharding import LOGICAL_RULES, batch_sharding


def bucket(n: int, minimum: int = 16, step: int = 256) -> int:
    """Round up to a power of two (at least ``minimum``), then to multiples of ``step``.

    Shapes in a bucket share one compiled program, so new batches rarely recompile.
    """
    n = max(n, minimum, 1)
    power = 1 << (n - 1).bit_length()
    return power if power <= step else step * math.ceil(n / step)


@dataclasses.dataclass
class GenerateOutput:
    """Completions of ``generate``, one row per (prompt, sample), prompt-major.

    ``tokens``/``logprobs``/``model_logprobs`` are cut after the first eos or stop sequence
    (kept). ``arrays`` holds the padded numpy arrays of ``SampleArrays`` for these rows.
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    model_logprobs: list[list[float]]
    finish_reasons: list[str]  # "stop" (eos or stop sequence) or "length"
    arrays: SampleArrays


def _mesh_of(model):
    """The mesh the model's weights live on, when it spans more than one device."""
    for leaf in jax.tree.leaves(nnx.state(model)):
        sharding = getattr(leaf, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and mesh.size > 1:
            return mesh
    return None


def _batch_shards(mesh) -> int:
    if mesh is None:
        return 1
    axes = LOGICAL_RULES["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def left_pad(prompts: Sequence[Sequence[int]], batch: int, length: int, pad_id: int = 0):
    """Left-pad prompts into ``[batch, length]`` ids and mask arrays (extra rows empty)."""
    ids_bt = np.full((batch, length), pad_id, np.int32)
    mask_bt = np.zeros((batch, length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids_bt[row, length - len(prompt) :] = prompt
            mask_bt[row, length - len(prompt) :] = 1
    return ids_bt, mask_bt


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = 0,
    *,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop: Sequence[Sequence[int]] | None = None,
    num_samples: int = 1,
    pad_token_id: int = 0,
    mesh=None,
) -> GenerateOutput:
    """Generate completions for token-id prompts of any lengths with a KV-cached sampler.

    ``temperature=0`` is greedy; otherwise tokens are drawn after the repetition penalty,
    temperature, top-k, top-p and min-p (the order transformers uses). ``eos_token_id``
    (an int or several) and ``stop`` (token sequences) end a completion; they are kept in
    the output. ``num_samples`` completions are drawn per prompt from one prefill; the
    outputs are prompt-major (row ``i * num_samples + j``).

    ``out.logprobs[r][i]`` is the log-probability of token ``i`` under the distribution it
    was sampled from (temperature-scaled, truncated and renormalized); at temperature 1
    with no filters it equals ``log_softmax`` of the model's logits. With greedy decoding
    it is the temperature-1 log-softmax (after any repetition penalty).
    ``out.model_logprobs`` are always the raw model's temperature-1 log-probs: consistent
    with a teacher-forced training forward pass (GRPO's importance ratio).

    Prompt length, batch size and ``max_new_tokens`` are bucketed (powers of two) so that
    new batches reuse compiled programs. With weights sharded over a multi-device mesh
    (or ``mesh`` given), the batch is split over its data axes.
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    config = SamplingConfig.make(
        max_new_tokens=bucket(max_new_tokens),
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        stop=stop,
        num_samples=num_samples,
        pad_token_id=pad_token_id,
    )
    mesh = mesh if mesh is not None else _mesh_of(model)
    shards = _batch_shards(mesh)
    batch = shards * bucket(math.ceil(len(prompts) / shards), minimum=1, step=64)
    length = bucket(max(len(p) for p in prompts))
    ids_bt, mask_bt = left_pad(prompts, batch, length, pad_token_id)
    graphdef, state = nnx.split(model)
    rng = jax.random.key(seed)
    if mesh is not None:
        with jax.set_mesh(mesh):
            arrays = sample_arrays(
                graphdef,
                state,
                jax.device_put(ids_bt, batch_sharding(mesh, 2)),
                jax.device_put(mask_bt, batch_sharding(mesh, 2)),
                rng,
                config,
                limit=max_new_tokens,
            )
    else:
        arrays = sample_arrays(graphdef, state, ids_bt, mask_bt, rng, config, limit=max_new_tokens)
    return _to_output(arrays, len(prompts) * num_samples, max_new_tokens)


def _to_output(arrays: SampleArrays, rows: int, max_new_tokens: int) -> GenerateOutput:
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x))[:rows], arrays)
    host = host.replace(
        tokens_bn=host.tokens_bn[:, :max_new_tokens],
        logprobs_bn=host.logprobs_bn[:, :max_new_tokens],
        model_logprobs_bn=host.model_logprobs_bn[:, :max_new_tokens],
    )
    lengths = host.lengths_b.tolist()
    return GenerateOutput(
        tokens=[row[:n].tolist() for row, n in zip(host.tokens_bn, lengths)],
        logprobs=[row[:n].tolist() for row, n in zip(host.logprobs_bn, lengths)],
        model_logprobs=[row[:n].tolist() for row, n in zip(host.model_logprobs_bn, lengths)],
        finish_reasons=["stop" if f else "length" for f in host.finished_b.tolist()],
        arrays=host,
    )
