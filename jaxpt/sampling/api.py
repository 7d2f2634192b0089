"""``generate``: token-id prompts in (lists, arrays or tokenizer output), lists of completions
out, over the jitted sampler."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from jaxpt.sampling.config import SamplingConfig
from jaxpt.sampling.engine import SampleArrays, sample_arrays
from jaxpt.sharding import batch_sharding, batch_shards, replicated


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


def left_pad(prompts: Sequence[Sequence[int]], batch: int, length: int, pad_id: int = 0):
    """Left-pad prompts into ``[batch, length]`` ids and mask arrays (extra rows empty)."""
    ids_bt = np.full((batch, length), pad_id, np.int32)
    mask_bt = np.zeros((batch, length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids_bt[row, length - len(prompt) :] = prompt
            mask_bt[row, length - len(prompt) :] = 1
    return ids_bt, mask_bt


PROMPT_FORMS = (
    "a list of prompts (each a list of token ids, a 1-D int array, or a mapping with "
    "'input_ids' such as tokenizer.apply_chat_template(..., add_generation_prompt=True)); "
    "one mapping with 'input_ids' of one prompt or a batch (tokenizer output, with an optional "
    "'attention_mask'); a 1-D int array or a flat list of ints (one prompt); or a 2-D int "
    "array (a batch)"
)


def _form_error(value, where: str, array=None) -> TypeError:
    kind = type(value).__name__
    array = value if array is None and hasattr(value, "dtype") else array
    if array is not None and array.dtype != object and array.ndim:
        kind += f" of {array.dtype} with shape {tuple(array.shape)}"
    hint = ""
    if isinstance(value, (str, bytes)):
        hint = " (encode text first: jaxpt.data.encode_prompt(tokenizer, text))"
    return TypeError(f"{where}: got {kind}{hint}; generate takes {PROMPT_FORMS}")


def _is_token_id(x) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, np.integer)):
        return True
    dtype = getattr(x, "dtype", None)  # a 0-d jax/numpy array, as iterating an array yields
    return getattr(x, "ndim", None) == 0 and dtype is not None and np.issubdtype(dtype, np.integer)


def _token_array(value, where: str) -> np.ndarray:
    """``value`` as integer ids of rank 1 (a prompt) or 2 (a rectangular batch)."""
    if isinstance(value, (str, bytes, Mapping)):
        raise _form_error(value, where)
    try:
        ids = np.asarray(value)
    except (TypeError, ValueError):  # ragged or mixed nesting
        raise _form_error(value, where) from None
    if ids.size == 0 and ids.ndim in (1, 2):
        return ids.astype(np.int64)  # [] has a float dtype; "no tokens" is reported later
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer) or ids.ndim not in (1, 2):
        raise _form_error(value, where, ids)
    return ids


def _unpadded_rows(ids, mask, where: str) -> list[list[int]]:
    """Rows of ``ids`` (rank 1 = one row) without the positions where ``mask`` is 0."""
    ids_bt = np.atleast_2d(ids)
    if mask is None:
        return ids_bt.tolist()
    mask_bt = np.atleast_2d(np.asarray(mask))
    if mask_bt.shape != ids_bt.shape:
        raise ValueError(
            f"{where}: attention_mask has shape {mask_bt.shape}, input_ids {ids_bt.shape}"
        )
    return [row[keep != 0].tolist() for row, keep in zip(ids_bt, mask_bt)]


def _mapping_rows(mapping: Mapping, where: str) -> list[list[int]]:
    if "input_ids" not in mapping:
        raise TypeError(
            f"{where}: got a mapping without 'input_ids'; generate takes {PROMPT_FORMS}"
        )
    ids = _token_array(mapping["input_ids"], f"{where}['input_ids']")
    return _unpadded_rows(ids, mapping.get("attention_mask"), where)


def _one_prompt(item, index: int) -> list[int]:
    """One element of a list of prompts: exactly one prompt."""
    where = f"prompts[{index}]"
    if isinstance(item, Mapping):
        rows = _mapping_rows(item, where)
    else:
        ids = _token_array(item, where)
        if ids.ndim == 2 and isinstance(item, Sequence):  # a list of lists inside the list
            raise _form_error(item, where)
        rows = _unpadded_rows(ids, None, where)
    if len(rows) != 1:
        raise TypeError(
            f"{where} holds {len(rows)} prompts; in a list each element is one prompt "
            "(pass a batch as one 2-D array or one tokenizer output instead)"
        )
    return rows[0]


def prompt_token_lists(prompts, attention_mask=None) -> list[list[int]]:
    """The prompts ``generate`` accepts, as one list of token ids per prompt.

    Accepted: a list whose elements are each one prompt (a list of ids, a 1-D int array,
    or a mapping with ``input_ids`` such as the ``BatchEncoding`` that
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` returns); one mapping
    with ``input_ids`` holding one prompt (1-D) or a batch (2-D, e.g. ``tokenizer(texts,
    padding=True)``); a 1-D int array (one prompt) or 2-D int array (a batch); and a flat
    list of ints, which is one prompt (a list of prompts holds lists, never bare ints).
    A mapping's ``attention_mask`` (or the ``attention_mask`` argument, for arrays and
    rectangular lists) drops the positions where it is 0: left or right padding.
    Anything else (text, floats, deeper nesting) is a ``TypeError`` naming these forms.
    """
    if isinstance(prompts, Mapping):
        if attention_mask is not None:
            raise ValueError("a mapping prompt carries its own 'attention_mask'")
        return _mapping_rows(prompts, "prompts")
    if isinstance(prompts, (str, bytes)):
        raise _form_error(prompts, "prompts")
    if hasattr(prompts, "__array__") and not isinstance(prompts, Sequence):  # numpy, jax, torch
        return _unpadded_rows(_token_array(prompts, "prompts"), attention_mask, "prompts")
    if not isinstance(prompts, Iterable):
        raise _form_error(prompts, "prompts")
    items = list(prompts)
    if attention_mask is not None or (items and all(_is_token_id(x) for x in items)):
        # One prompt (flat ints) or, with a mask, a rectangular batch.
        return _unpadded_rows(_token_array(items, "prompts"), attention_mask, "prompts")
    return [_one_prompt(item, i) for i, item in enumerate(items)]


def generate(
    model,
    prompts,
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
    attention_mask=None,
    sampler: str = "auto",
    record_routing: bool = False,
) -> GenerateOutput:
    """Generate completions for token-id prompts of any lengths with a KV-cached sampler.

    ``prompts`` is a list of token-id lists, or what a tokenizer returns: a list of
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` results, one
    ``tokenizer(texts, padding=True)`` batch (its ``attention_mask`` drops the padding), or
    int arrays (1-D one prompt, 2-D a batch, with an optional ``attention_mask``); a flat
    list of ints is one prompt. See ``prompt_token_lists`` for the exact rules.

    ``temperature=0`` is greedy; otherwise tokens are drawn after the repetition penalty,
    temperature, top-k, top-p and min-p (the order transformers uses). ``eos_token_id``
    (an int or several) and ``stop`` (token sequences) end a completion; they are kept in
    the output. ``num_samples`` completions are drawn per prompt from one prefill; the
    outputs are prompt-major (row ``i * num_samples + j``).

    ``out.logprobs[r][i]`` is the log-probability of token ``i`` under the distribution it
    was sampled from (temperature-scaled, truncated and renormalized); at temperature 1
    with no filters it equals ``log_softmax`` of the model's logits. With greedy decoding
    it is the temperature-1 log-softmax (after any repetition penalty).
    ``out.model_logprobs`` are always the raw model's temperature-1 log-probs: what a
    teacher-forced forward pass computes. ``out.arrays.policy_logprobs_bn`` are those at
    the sampling temperature (``log_softmax(logits / temperature)``, no penalty or
    filters): the old log-probs of a GRPO/PPO importance ratio.

    Prompt length, batch size and ``max_new_tokens`` are bucketed (powers of two) so that
    new batches reuse compiled programs. With weights sharded over a multi-device mesh
    (or ``mesh`` given), the batch is split over its data axes; weights that live on one
    device are copied to every device of ``mesh`` for the call (place them once with
    ``jaxpt.sharding.replicated`` to skip the copy). On a CPU host that is how sampling
    uses every core: one JAX CPU device per core (``jax_num_cpu_devices``) and a data mesh
    over them.

    ``sampler`` picks the decoding loop: ``paged`` (the continuous-batching engine,
    ``jaxpt.sampling.continuous``: rows leave as soon as they end and waiting ones take
    their slot, prompts prefilled once per ``num_samples``), ``static`` (one batch whose
    rows all run until the longest ends, ``engine.sample_arrays``), or ``auto``: see
    ``choose_sampler``. Both give the same tokens and log-probs for the same seed.

    ``record_routing`` (MoE models) also returns the expert ids every layer routed every
    token to, ``out.arrays.routing_btlk`` [rows, T, L, k]: the left-padded prompt (padded
    to a length bucket) then ``max_new_tokens`` columns (see ``SampleArrays``).
    """
    prompts = prompt_token_lists(prompts, attention_mask)
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
    weights_mesh = _mesh_of(model)
    mesh = mesh if mesh is not None else weights_mesh
    if choose_sampler(sampler, config, mesh, record_routing) == "paged":
        from jaxpt.sampling.continuous import generate_paged

        completions = generate_paged(nnx.split(model), prompts, max_new_tokens, config,
                                     jax.random.key(seed))
        return _completions_output(completions, config.max_new_tokens, max_new_tokens,
                                   pad_token_id)
    shards = batch_shards(mesh)
    batch = shards * bucket(math.ceil(len(prompts) / shards), minimum=1, step=64)
    length = bucket(max(len(p) for p in prompts))
    ids_bt, mask_bt = left_pad(prompts, batch, length, pad_token_id)
    graphdef, state = nnx.split(model)
    if mesh is not None and weights_mesh is None:  # one device's weights: on every device
        state = jax.device_put(state, replicated(mesh))
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
                record_routing=record_routing,
            )
    else:
        arrays = sample_arrays(graphdef, state, ids_bt, mask_bt, rng, config, limit=max_new_tokens,
                               record_routing=record_routing)
    return _to_output(arrays, len(prompts) * num_samples, max_new_tokens, length)


SAMPLERS = ("auto", "paged", "static")


def choose_sampler(sampler: str, config: SamplingConfig, mesh=None,
                   record_routing: bool = False) -> str:
    """The sampler ``auto`` means: the paged engine, except where the static sampler is as
    fast or the engine does not go yet.

    - With no eos id and no stop sequence every row runs to ``max_new_tokens``: nothing
      leaves early, so continuous batching has nothing to gain, and the static sampler's
      contiguous cache is faster (bench-tiny, 32 rows x 128 tokens, one CPU core: about
      10% more tokens/s).
    - A multi-device mesh (the engine does not shard its batch yet), a repetition
      penalty (the engine does not apply one) or ``record_routing`` (the engine does not
      record MoE routing for replay) take the static sampler.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    static_only = ((mesh is not None and mesh.size > 1) or config.repetition_penalty is not None
                   or record_routing)
    if sampler == "paged" and static_only:
        raise ValueError("the paged engine runs on one device without a repetition penalty "
                         "and does not record routing; use sampler='static'")
    if sampler == "auto":
        uniform = not config.eos_token_ids and not config.stop
        return "static" if static_only or uniform else "paged"
    return sampler


def _completions_output(completions, width: int, max_new_tokens: int,
                        pad_token_id: int) -> GenerateOutput:
    from jaxpt.sampling.continuous import completions_to_arrays

    arrays = completions_to_arrays(completions, width, pad_token_id)
    return _to_output(arrays, len(completions), max_new_tokens)


def _to_output(arrays: SampleArrays, rows: int, max_new_tokens: int,
               prompt_length: int = 0) -> GenerateOutput:
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x))[:rows], arrays)
    if host.routing_btlk is not None:
        host = host.replace(routing_btlk=host.routing_btlk[:, : prompt_length + max_new_tokens])
    host = host.replace(
        tokens_bn=host.tokens_bn[:, :max_new_tokens],
        logprobs_bn=host.logprobs_bn[:, :max_new_tokens],
        model_logprobs_bn=host.model_logprobs_bn[:, :max_new_tokens],
        policy_logprobs_bn=host.policy_logprobs_bn[:, :max_new_tokens],
    )
    lengths = host.lengths_b.tolist()
    return GenerateOutput(
        tokens=[row[:n].tolist() for row, n in zip(host.tokens_bn, lengths)],
        logprobs=[row[:n].tolist() for row, n in zip(host.logprobs_bn, lengths)],
        model_logprobs=[row[:n].tolist() for row, n in zip(host.model_logprobs_bn, lengths)],
        finish_reasons=["stop" if f else "length" for f in host.finished_b.tolist()],
        arrays=host,
    )
