"""Prompts in, samples and their text out: the one path of every job that generates from
prompt rows (RL rollouts, rejection sampling, task evals, judges).

``PromptSampler`` holds what those jobs must agree on: where a reply ends
(``jaxpt.data.eos_token_ids`` of the tokenizer and the model dir), how a prompt becomes ids
(``jaxpt.data.encode_prompt``: the chat template or plain text; past ``max_prompt_length``
the end is kept, where the question is), how a batch is laid out for the jitted sampler
(prompts left-padded to a power-of-two length bucket, rows padded so that the mesh's batch
shards divide the sampled rows: one compiled program per bucket), where it runs (the mesh
the weights live on, or the one given) and how tokens become text. ``launch`` dispatches
the sampler and returns at once; ``collect`` waits, drops the padding rows and decodes, so
the host can score one batch while the devices sample the next. On one device the
sampler is the continuous-batching engine (``sampler="auto"``, see
``api.choose_sampler``), whose host-side scheduler makes ``launch`` return when the batch
is done.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from jaxpt.sampling.api import bucket, choose_sampler, left_pad
from jaxpt.sampling.config import SamplingConfig
from jaxpt.sampling.continuous import completions_to_arrays, generate_paged
from jaxpt.sampling.engine import SampleArrays, sample_arrays
from jaxpt.sharding import batch_shards, named_sharding, replicated


@dataclasses.dataclass
class LaunchedBatch:
    """A dispatched sampler call: its device arrays (padding rows included) and prompts."""

    arrays: SampleArrays  # device arrays, [rows * num_samples, ...]
    prompt_ids: np.ndarray  # [P, Lp] left-padded ids of the real prompts (host)
    prompt_mask: np.ndarray  # [P, Lp] 1 on real prompt tokens


@dataclasses.dataclass
class PromptSamples:
    """The samples of ``P`` prompts, ``num_samples`` rows per prompt, prompt-major (row
    ``p * num_samples + j``); a launch's padding rows are gone."""

    prompt_ids: np.ndarray  # [P, Lp] left-padded prompt ids
    prompt_mask: np.ndarray  # [P, Lp] 1 on real prompt tokens
    arrays: SampleArrays  # host numpy arrays, one row per sample (see SampleArrays)
    texts: list[str]  # each row's tokens up to its length, decoded without special tokens

    @property
    def lengths(self) -> list[int]:
        """Tokens generated per row (an eos or stop sequence included)."""
        return self.arrays.lengths_b.tolist()


def to_host(x) -> np.ndarray:
    """A jax array as a numpy array on every process (gathered when other processes hold
    parts of it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def prompt_as_seen(tokenizer, prompt, *, chat: bool = True):
    """A prompt as ``PromptSampler.encode`` shows it to the model: a text under a chat
    template is one user turn (how a reward model should read it too)."""
    if isinstance(prompt, str) and chat and getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": prompt}]
    return prompt


def _weights_mesh(state):
    """The mesh the weights live on, when it spans more than one device."""
    for leaf in jax.tree.leaves(state):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if mesh is not None and mesh.size > 1:
            return mesh
    return None


def _split(policy):
    """``(graphdef, state)`` of a model, or of ``policy`` already split that way."""
    return nnx.split(policy) if isinstance(policy, nnx.Module) else tuple(policy)


class PromptSampler:
    """Samples completions of prompts with the jitted sampler; see the module docstring.

    ``eos_token_id`` overrides the end-of-reply ids, which are otherwise
    ``eos_token_ids(tokenizer, model_path)``. ``chat=False`` encodes text prompts without
    the chat template. ``max_prompt_length`` truncates encoded prompts (keeping their end);
    with ``pad_to_max_prompt_length`` every batch is that wide (RL train rows have one
    layout). ``batch_size`` fixes the prompts per launch: every launch is padded to it, so
    one program serves them all; None pads each launch to a bucket (``api.bucket``).
    ``mesh`` runs the sampler there; None: the mesh the weights live on, if any.
    ``sampling`` (a ``SamplingConfig``) may be replaced between launches.
    ``record_routing`` (MoE models) also returns each token's routed expert ids
    (``SampleArrays.routing_btlk``, prompt columns then completion columns): it samples
    with the static sampler.
    """

    def __init__(
        self,
        tokenizer,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        num_samples: int = 1,
        model_path: str | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        chat: bool = True,
        max_prompt_length: int | None = None,
        pad_to_max_prompt_length: bool = False,
        batch_size: int | None = None,
        mesh=None,
        sampler: str = "auto",
        record_routing: bool = False,
    ):
        from jaxpt.data import eos_token_ids

        if pad_to_max_prompt_length and max_prompt_length is None:
            raise ValueError("pad_to_max_prompt_length needs a max_prompt_length")
        self.tokenizer, self.chat, self.mesh = tokenizer, chat, mesh
        self.max_prompt_length = max_prompt_length
        self.pad_to_max_prompt_length = pad_to_max_prompt_length
        self.batch_size = batch_size
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        if eos_token_id is None:
            eos_token_id = eos_token_ids(tokenizer, model_path)
        self.sampling = SamplingConfig.make(
            max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=top_p,
            top_k=top_k, eos_token_id=eos_token_id, num_samples=num_samples,
            pad_token_id=self.pad_id,
        )
        self.sampler, self.record_routing = sampler, record_routing
        # An unknown name (or the engine asked to record routing) fails here.
        choose_sampler(sampler, self.sampling, record_routing=record_routing)
        self.truncated_prompts = 0  # prompts cut to max_prompt_length by ``encode``

    # -- prompts
    def encode(self, prompt) -> list[int]:
        """Token ids of one prompt (text or chat messages), truncated to keep its end."""
        from jaxpt.data import encode_prompt

        ids = encode_prompt(self.tokenizer, prompt, chat_template=self.chat)
        if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
            ids = ids[-self.max_prompt_length :]
            self.truncated_prompts += 1
        return ids

    def _layout(self, prompts: Sequence[Sequence[int]], mesh) -> tuple[int, int]:
        """(rows, length) of the padded prompt batch."""
        longest = max(map(len, prompts))
        limit = self.max_prompt_length
        if self.pad_to_max_prompt_length:
            length = limit
        else:
            length = bucket(longest) if limit is None else min(bucket(longest), limit)
        if longest > length:
            raise ValueError(f"a prompt of {longest} tokens is over max_prompt_length {limit}")
        # The decode rows (prompts x samples) split evenly over the batch shards; prompts
        # that the shards do not divide are prefilled replicated (see logical_to_spec).
        shards = batch_shards(mesh)
        unit = shards // math.gcd(shards, self.sampling.num_samples)
        rows = self.batch_size or bucket(len(prompts), minimum=1, step=64)
        return -(-rows // unit) * unit, length

    # -- sampling
    def launch(self, policy, prompts: Sequence[Sequence[int]], key) -> LaunchedBatch:
        """Dispatch the sampler on ``prompts`` (ids, e.g. from ``encode``) with the weights
        of ``policy`` (a model, or ``(graphdef, state)`` with ``state`` possibly a tuple of
        states) and the JAX ``key``; returns without waiting. Row ``r`` of the output
        draws from ``fold_in(key, r)``, whatever the padding or the mesh."""
        if not prompts:
            raise ValueError("sampling needs at least one prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if self.batch_size is not None and len(prompts) > self.batch_size:
            raise ValueError(f"{len(prompts)} prompts in a launch of batch_size {self.batch_size}")
        graphdef, state = _split(policy)
        weights_mesh = _weights_mesh(state)
        mesh = self.mesh if self.mesh is not None else weights_mesh
        rows, length = self._layout(prompts, mesh)
        # Padding rows repeat the first prompt (every row needs a token); they are dropped.
        padded = list(prompts) + [prompts[0]] * (rows - len(prompts))
        ids_bt, mask_bt = left_pad(padded, rows, length, self.pad_id)
        n = len(prompts)
        if choose_sampler(self.sampler, self.sampling, mesh, self.record_routing) == "paged":
            completions = generate_paged(
                (graphdef, state), prompts, self.sampling.max_new_tokens, self.sampling, key,
                rows=rows * self.sampling.num_samples, max_prompt_len=length,
            )
            arrays = completions_to_arrays(completions, self.sampling.max_new_tokens, self.pad_id)
            return LaunchedBatch(arrays, ids_bt[:n], mask_bt[:n])
        record = {"record_routing": self.record_routing}
        if mesh is None:
            arrays = sample_arrays(graphdef, state, ids_bt, mask_bt, key, self.sampling, **record)
        else:
            if weights_mesh is None and mesh.size > 1:  # one device's weights: on every device
                state = jax.device_put(state, replicated(mesh))
            with jax.set_mesh(mesh):
                sharding = named_sharding(mesh, ("batch", None), ids_bt.shape)
                put = lambda host: jax.make_array_from_callback(
                    host.shape, sharding, lambda index: host[index]
                )
                arrays = sample_arrays(graphdef, state, put(ids_bt), put(mask_bt), key,
                                       self.sampling, **record)
        return LaunchedBatch(arrays, ids_bt[:n], mask_bt[:n])

    def collect(self, launched: LaunchedBatch) -> PromptSamples:
        """Wait for a launch; its real rows on the host, decoded."""
        num_rows = len(launched.prompt_ids) * self.sampling.num_samples
        arrays = jax.tree.map(lambda x: to_host(x)[:num_rows], launched.arrays)
        texts = self.tokenizer.batch_decode(
            [row[:n].tolist() for row, n in zip(arrays.tokens_bn, arrays.lengths_b)],
            skip_special_tokens=True,
        )
        return PromptSamples(launched.prompt_ids, launched.prompt_mask, arrays, list(texts))

    def sample(self, policy, prompts: Sequence[Sequence[int]], key) -> PromptSamples:
        """``collect(launch(...))``."""
        return self.collect(self.launch(policy, prompts, key))

    def sample_in_chunks(
        self, policy, prompts: Sequence[Sequence[int]], *, seed: int = 0,
        chunk_size: int | None = None,
    ) -> Iterator[PromptSamples]:
        """The samples of ``prompts`` (ids), ``chunk_size`` prompts per launch (None: one
        launch), in order; the chunk from prompt ``begin`` draws with ``key(seed + begin)``.
        Each chunk is dispatched before the previous one is collected."""
        policy = _split(policy)
        size = chunk_size or max(len(prompts), 1)
        pending = None
        for begin in range(0, len(prompts), size):
            launched = self.launch(policy, prompts[begin : begin + size],
                                   jax.random.key(seed + begin))
            if pending is not None:
                yield self.collect(pending)
            pending = launched
        if pending is not None:
            yield self.collect(pending)
