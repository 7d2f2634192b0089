"""The continuous-batching engine: requests join and leave a running batch of decode slots
over a paged KV cache.

A fixed number of slots decode together in one jitted loop of up to ``steps_per_call``
tokens. A row that ends (eos, stop sequence, its own token budget) leaves at once: its
slot and pages are free for the next request, whose prompt is prefilled in chunks (a
bucketed ``[rows, chunk]`` program, so a long prompt never stalls the batch for long) and
whose first token joins the loop at the next call. The loop returns early when enough
slots have freed up for waiting requests. Shapes are bucketed, so steady state never
recompiles.

Pages come from one preallocated pool (``jaxpt.models.paged``) that the host scheduler
hands out (``page_pool.PagePool``): a request's ``n`` samples share its prompt's pages
(prefilled once; only the last, partly filled page is copied per sample), and full pages
of a prompt stay registered by content, so a later request with the same prefix (a common
system prompt) shares them instead of prefilling again. When the pool runs dry the newest
sample is preempted: its pages are freed and it is requeued, to be prefilled again with
what it had generated, continuing exactly (its keys fold in the token index).

Sampling is the static sampler's arithmetic (``processors.choose_with_logprobs``, keys
``fold_in(row_key, token_index)``), so for the same row keys the tokens and log-probs are
the same as ``engine.sample_arrays``'.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import deque
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.models.decode import decode_step
from jaxpt.models.decoder import with_layers_unstacked
from jaxpt.models.layers import target_platform
from jaxpt.models.paged import PagedKVCache, default_layout
from jaxpt.sampling.config import SamplingConfig
from jaxpt.sampling.engine import SampleArrays, _merge, _StaticGraph
from jaxpt.sampling.page_pool import PagePool
from jaxpt.sampling.processors import choose_with_logprobs

_TRACES = 0  # engine programs traced (compiled); tests read it via trace_count()


def trace_count() -> int:
    return _TRACES


def _pow2(n: int, minimum: int = 1) -> int:
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def _pow4(n: int) -> int:
    """Row buckets of the prefill and first-token programs: 1, 4, 16, ... (few programs;
    a padding row costs little next to a compile)."""
    size = 1
    while size < n:
        size *= 4
    return size


def _model(graph, state):
    model = _merge(graph.graphdef, state)
    if target_platform() == "cpu":  # slice the stacked layers once per program
        model = with_layers_unstacked(model)
    return model


@functools.partial(
    jax.jit, static_argnames=("graph", "page_size", "layout"), donate_argnames=("pages",)
)
def _prefill(graph, state, pages, table_rp, ids_rc, start_r, count_r, *, page_size, layout):
    """Write ``count_r`` tokens of each row (from position ``start_r``) into its pages;
    the float32 logits [R, V] after each row's last token."""
    global _TRACES
    _TRACES += 1
    model = _merge(graph.graphdef, state)
    c = ids_rc.shape[1]
    positions_rc = start_r[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    segment_rc = (jnp.arange(c)[None, :] < count_r[:, None]).astype(jnp.int32)
    cache = PagedKVCache(pages, table_rp, page_size, layout)
    hidden_rcd, cache = model(ids_rc, positions_rc, segment_rc, cache=cache, return_hidden=True)
    last_r = jnp.maximum(count_r - 1, 0)
    hidden_rd = jnp.take_along_axis(hidden_rcd, last_r[:, None, None], axis=1)
    return model.logits(hidden_rd)[:, 0, :], cache.pages


@functools.partial(jax.jit, static_argnames=("config",))
def _first_tokens(logits_rv, source_n, key_data_n, index_n, *, config):
    """The first (or, after a preemption, the next) token of ``n`` samples from the
    logits of their prompt rows ``source_n``."""
    global _TRACES
    _TRACES += 1
    keys_n = jax.vmap(lambda k, i: jax.random.fold_in(jax.random.wrap_key_data(k), i))(
        key_data_n, index_n
    )
    return choose_with_logprobs(logits_rv[source_n], keys_n, config)


def _placed_like(pages, state):
    """``pages`` replicated over the mesh the weights live on (so the programs' outputs,
    placed there, have the inputs' sharding and never trigger a retrace)."""
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            return jax.device_put(pages, replicated)
    return pages


def sample_key_data(key, count: int) -> np.ndarray:
    """The raw keys ``fold_in(key, i)`` for ``i < count`` (one program per power of two)."""
    ids = np.arange(_pow2(count), dtype=np.uint32)
    return np.asarray(_sample_key_data(key, ids))[:count]


@jax.jit
def _sample_key_data(key, samples):
    """The raw key of each sample: ``fold_in(key, sample)``."""
    return jax.random.key_data(jax.vmap(jax.random.fold_in, (None, 0))(key, samples))


@functools.partial(jax.jit, donate_argnames=("pages",))
def _copy_pages(pages, source_m, target_m):
    """Pages ``target_m`` become copies of pages ``source_m`` in every layer."""
    return jax.tree.map(lambda x: x.at[target_m].set(x[source_m]), pages)


@functools.partial(
    jax.jit,
    static_argnames=("graph", "config", "steps", "page_size", "layout", "stops"),
    donate_argnames=("pages",),
)
def _decode(graph, state, pages, table_bp, token_b, pos_b, index_b, budget_b, key_data_b,
            active_b, recent_bw, eos_e, exit_after, *, config, steps, page_size, layout, stops):
    """Up to ``steps`` decode steps of every active row; stops early once ``exit_after``
    rows have ended (slots for waiting requests) or no row is active.

    Per row: ``token_b`` (not yet in the cache) sits at position ``pos_b`` and is
    followed by the token of index ``index_b`` (drawn with ``fold_in(key, index)``);
    ``budget_b`` is the row's last index + 1; ``recent_bw`` its last generated tokens (for
    stop sequences, -1 where none). Returns the new pages, the tokens and three log-probs
    per row and step ([B, steps]), and the steps run.
    """
    global _TRACES
    _TRACES += 1
    model = _model(graph, state)
    b = token_b.shape[0]
    row_keys = jax.random.wrap_key_data(key_data_b)

    def cond(carry):
        step, _, _, _, _, active_b, _, ended, _ = carry
        return (step < steps) & jnp.any(active_b) & (ended < exit_after)

    def body(carry):
        step, pages, token_b, pos_b, index_b, active_b, recent_bw, ended, out = carry
        cache = PagedKVCache(pages, table_bp, page_size, layout)
        logits_vb, cache = decode_step(model, token_b, pos_b, cache)
        keys_b = jax.vmap(jax.random.fold_in)(row_keys, index_b)
        new_b, lp_b, model_lp_b, policy_lp_b = choose_with_logprobs(logits_vb, keys_b, config,
                                                                     axis=0)
        column = lambda buf, x: buf.at[:, step].set(x)
        out = tuple(column(buf, x) for buf, x in zip(out, (new_b, lp_b, model_lp_b, policy_lp_b)))
        recent_bw = jnp.concatenate([recent_bw[:, 1:], new_b[:, None]], axis=1)
        stop_b = jnp.any(new_b[:, None] == eos_e[None, :], axis=1)
        for seq in stops:
            tail = recent_bw[:, recent_bw.shape[1] - len(seq):]
            stop_b = stop_b | jnp.all(tail == jnp.asarray(seq, jnp.int32)[None, :], axis=1)
        end_b = active_b & (stop_b | (index_b + 1 >= budget_b))
        ended = ended + jnp.sum(end_b, dtype=jnp.int32)
        token_b = jnp.where(active_b, new_b, token_b)
        pos_b = jnp.where(active_b, pos_b + 1, pos_b)
        index_b = jnp.where(active_b, index_b + 1, index_b)
        return (step + 1, cache.pages, token_b, pos_b, index_b, active_b & ~end_b, recent_bw,
                ended, out)

    out = (jnp.zeros((b, steps), jnp.int32),) + tuple(
        jnp.zeros((b, steps), jnp.float32) for _ in range(3)
    )
    carry = (jnp.asarray(0, jnp.int32), pages, token_b, pos_b, index_b, active_b, recent_bw,
             jnp.asarray(0, jnp.int32), out)
    step, pages, *_, out = jax.lax.while_loop(cond, body, carry)
    return pages, out, step


@dataclasses.dataclass
class Completion:
    """One sample's generated tokens and log-probs (see ``engine.SampleArrays``);
    ``finish_reason`` is "stop" (eos or stop sequence) or "length"."""

    request_id: int
    sample: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    model_logprobs: list[float] = dataclasses.field(default_factory=list)
    policy_logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class _Sequence:
    """A sample being served: its completion, its pages and where it sits."""

    completion: Completion
    prompt: list[int]  # the request's prompt (+ what it generated before a preemption)
    budget: int  # the sample's last token index + 1
    key_data: np.ndarray
    prompt_len: int = 0  # the request's own prompt, a prefix of ``prompt``
    pages: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the pages so far
    order: int = 0  # admission order: the newest is preempted first
    hold: bool = False  # when it ends, keep its pages for ``Engine.resume``


@dataclasses.dataclass
class _Request:
    request_id: int
    samples: list[_Sequence]  # sample 0 prefills; the others fork from it


@dataclasses.dataclass
class EngineStats:
    prefill_tokens: int = 0  # prompt tokens run through the model
    prefix_hit_tokens: int = 0  # prompt tokens found in shared pages instead
    decode_calls: int = 0
    decode_steps: int = 0
    preemptions: int = 0


def _samples(item) -> list[_Sequence]:
    return item.samples if isinstance(item, _Request) else [item]


class Engine:
    """Continuous batching over a paged KV cache for one model and one ``SamplingConfig``
    (its temperature and filters, eos ids and stop sequences; ``max_new_tokens`` and
    ``num_samples`` are per request here).

    ``add(prompt, max_new_tokens, key, n)`` queues a request of ``n`` samples (sample
    ``j`` draws from ``fold_in(key, j)`` unless ``key`` already holds ``n`` keys);
    ``step()`` runs one scheduling round and returns the completions that changed;
    ``run()`` steps until every request is done. ``set_weights`` swaps in new weights
    (an RL step) without recompiling; cached prefixes are dropped with the old weights.

    A request added with ``hold=True`` keeps its pages when it ends (its slot is free):
    ``resume(request_id, tokens, ...)`` then appends ``tokens`` (a tool's result, a user's
    reply) after what it generated and decodes on, prefilling only the new tokens into the
    same pages; ``release(request_id)`` frees them. Multi-turn episodes run this way.

    ``slots`` rows decode together; the pool holds ``num_pages`` pages of ``page_size``
    tokens, or enough pages for ``kv_tokens`` tokens (default: every slot at
    ``max_seq_len``, so nothing is ever preempted); ``max_seq_len`` bounds prompt +
    completion.
    """

    def __init__(
        self,
        model,
        config: SamplingConfig,
        *,
        slots: int = 32,
        max_seq_len: int = 2048,
        page_size: int | None = None,
        num_pages: int | None = None,
        kv_tokens: int | None = None,
        steps_per_call: int = 16,
        prefill_chunk: int = 256,
        prefill_tokens: int = 2048,
        join_batch: int = 1,
    ):
        if config.repetition_penalty is not None:
            raise ValueError("the paged engine does not apply a repetition penalty; use "
                             "jaxpt.sampling.sample_arrays")
        graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
        self._graph, self.state = _StaticGraph(graphdef), state
        if not isinstance(model, nnx.Module):
            model = _merge(graphdef, state)
        self.config = dataclasses.replace(config, eos_token_ids=(), max_new_tokens=1,
                                          num_samples=1)
        eos = config.eos_token_ids
        self._eos_e = np.full(_pow2(len(eos), 4), -1, np.int32)
        self._eos_e[: len(eos)] = eos
        self._eos = set(eos)
        self._stops = tuple(tuple(s) for s in config.stop)
        self._window = max([len(s) for s in self._stops], default=1)
        self.page_size = page_size or self.default_page_size()
        self.slots, self.max_seq_len = slots, max_seq_len
        self.pages_per_seq = -(-max_seq_len // self.page_size)
        if num_pages is not None and kv_tokens is not None:
            raise ValueError("give the pool as num_pages or as kv_tokens, not both")
        if kv_tokens is not None:  # whole pages, plus the scratch page
            num_pages = max(-(-kv_tokens // self.page_size), 1) + 1
        if num_pages is None:
            num_pages = slots * self.pages_per_seq + 1
        self.steps_per_call, self.prefill_chunk = steps_per_call, prefill_chunk
        self.join_batch = join_batch
        self.prefill_tokens = max(prefill_tokens, prefill_chunk)
        self.layout = default_layout(target_platform(), model.config.head_dim)
        cache = PagedKVCache.init(model.config, num_pages, self.page_size, model.dtype,
                                  self.layout)
        self._pages = _placed_like(cache.pages, state)
        self.bytes_per_token = cache.bytes_per_token()
        self.pool = PagePool(num_pages, self.page_size)
        self.stats = EngineStats()
        self._waiting: deque[_Sequence | _Request] = deque()
        self._held: dict[tuple[int, int], _Sequence] = {}  # (request, sample) -> ended, paged
        self._prefilling: list[_Request | _Sequence] = []
        self._slot_seq: list[_Sequence | None] = [None] * slots
        self._ids = itertools.count()
        self._orders = itertools.count()
        # Per-slot decode state (host truth, sent with each call).
        self._token = np.zeros(slots, np.int32)
        self._pos = np.zeros(slots, np.int32)
        self._index = np.zeros(slots, np.int32)
        self._budget = np.zeros(slots, np.int32)
        self._keys = np.zeros((slots, *jax.random.key_data(jax.random.key(0)).shape), np.uint32)
        self._recent = np.full((slots, self._window), -1, np.int32)

    @staticmethod
    def default_page_size() -> int:
        """Tokens per page: on CPU, where decode attention loops over pages, larger pages
        run fewer, longer steps (128 measured fastest on bench-tiny); accelerator
        kernels take small pages."""
        return 128 if target_platform() == "cpu" else 16

    # -- requests
    def set_weights(self, state) -> None:
        self.state = state
        self.pool.forget_prefixes()

    def add(self, prompt: Sequence[int], max_new_tokens: int, key, n: int = 1,
            hold: bool = False) -> int:
        """Queue ``n`` samples of ``prompt``; returns the request id. With ``hold`` each
        sample keeps its pages when it ends, for ``resume``."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        self._check_length(len(prompt), max_new_tokens)
        if n > self.slots:
            raise ValueError(f"n={n} samples need {n} slots; the engine has {self.slots}")
        request_id = next(self._ids)
        key_data = self._key_data(key, n)
        samples = [
            _Sequence(Completion(request_id, j), prompt, max_new_tokens, key_data[j], len(prompt),
                      hold=hold)
            for j in range(n)
        ]
        self._waiting.append(_Request(request_id, samples))
        return request_id

    def resume(self, request_id: int, tokens: Sequence[int], max_new_tokens: int, key,
               sample: int = 0, hold: bool = True) -> int:
        """Continue a held sample: ``tokens`` follow what it generated and it decodes up
        to ``max_new_tokens`` more from ``key``, in its own pages (only ``tokens`` and its
        last generated token, which was never fed, are prefilled). Returns the id of the
        new request, whose completion holds the new tokens alone."""
        seq = self._held.pop((request_id, sample), None)
        if seq is None:
            raise KeyError(f"request {request_id} sample {sample} is not held")
        history = seq.prompt[: seq.prompt_len] + seq.completion.tokens
        prompt = history + [int(t) for t in tokens]
        try:
            self._check_length(len(prompt), max_new_tokens)
        except ValueError:
            self._held[(request_id, sample)] = seq  # still the caller's to release
            raise
        new_id = next(self._ids)
        # The pages hold every history token but the last (sampled, never fed back), unless
        # the pool needed them meanwhile: then the whole history is prefilled again.
        resumed = _Sequence(Completion(new_id, 0), prompt, max_new_tokens,
                            self._key_data(key, 1)[0], len(prompt), pages=seq.pages,
                            prefilled=len(history) - 1 if seq.pages else 0, hold=hold)
        self._waiting.append(_Request(new_id, [resumed]))
        return new_id

    def release(self, request_id: int, sample: int = 0) -> None:
        """Free a held sample's pages (its episode is over)."""
        seq = self._held.pop((request_id, sample), None)
        if seq is not None:
            self.pool.release(seq.pages)
            seq.pages = []

    def held(self) -> int:
        """Samples that ended holding their pages."""
        return len(self._held)

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt_len + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"a prompt of {prompt_len} tokens plus max_new_tokens {max_new_tokens} is "
                f"over the engine's max_seq_len {self.max_seq_len}"
            )

    def _key_data(self, key, n: int) -> np.ndarray:
        if isinstance(key, np.ndarray) and key.dtype == np.uint32:  # raw keys, one per sample
            key_data = key.reshape(n, -1) if key.ndim == 1 and n == 1 else key
        elif jnp.ndim(key) == 0:
            key_data = sample_key_data(key, n)
        else:
            key_data = np.asarray(jax.random.key_data(key))
        if len(key_data) != n:
            raise ValueError(f"{len(key_data)} keys for n={n} samples")
        return key_data

    def cancel(self, request_id: int) -> None:
        """Drop a request wherever it is (queued, prefilling, decoding): its slots and
        pages are free at once; its unfinished completions end with reason "cancelled"."""
        def ours(item):
            return _samples(item)[0].completion.request_id == request_id

        for item in [i for i in self._waiting if ours(i)]:
            self._waiting.remove(item)
        for item in [i for i in self._prefilling if ours(i)]:
            self._unadmit(item)
            self._waiting.remove(item)
        for seq in self._slot_seq:
            if seq is not None and seq.completion.request_id == request_id:
                seq.completion.finish_reason = "cancelled"
                self._finish(seq)
        for held_id, sample in [k for k in self._held if k[0] == request_id]:
            self.release(held_id, sample)

    def busy_slots(self) -> int:
        """Slots holding a sample (prefilling or decoding)."""
        return sum(seq is not None for seq in self._slot_seq)

    def pending(self) -> bool:
        return bool(self._waiting or self._prefilling or any(self._slot_seq))

    def kv_bytes(self) -> dict:
        """The pool's bytes and the most its sequences have held at once."""
        page_bytes = self.bytes_per_token * self.page_size
        return {"kv_pool_bytes": self.pool.num_pages * page_bytes,
                "kv_peak_bytes": self.pool.peak_used * page_bytes}

    # -- scheduling
    def run(self) -> list[Completion]:
        """Step until every queued request is done; their completions in request order."""
        done: dict[tuple[int, int], Completion] = {}
        while self.pending():
            for completion in self.step():
                if completion.finished:
                    done[(completion.request_id, completion.sample)] = completion
        return [done[k] for k in sorted(done)]

    def step(self) -> list[Completion]:
        """One round: admit what fits, prefill one chunk of each prefilling prompt, then
        decode up to ``steps_per_call`` tokens. Returns the completions that changed."""
        changed: list[Completion] = []
        self._admit()
        if self._waiting and not self._prefilling and not any(self._slot_seq):
            raise self._pool_too_small(
                f"one sequence of {len(_samples(self._waiting[0])[0].prompt)} prompt tokens"
            )
        if self._prefilling:
            changed += self._prefill_round()
        if any(s is not None and s.prefilled == len(s.prompt) for s in self._slot_seq):
            changed += self._decode_round()
        return changed

    def _free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self._slot_seq) if s is None]

    def _admit(self) -> None:
        while self._waiting:
            item = self._waiting[0]
            seqs = _samples(item)
            free = self._free_slots()
            if len(free) < len(seqs):
                return
            lead = seqs[0]
            if lead.pages:  # resumed: its pages hold its history already
                need = max(-(-len(lead.prompt) // self.page_size) - len(lead.pages), 0)
                pages = self._allocate(need, keep=lead)
                if pages is None:
                    return
                self._waiting.popleft()
                lead.pages = lead.pages + pages
            else:
                shared = self.pool.match_prefix(lead.prompt)
                need = -(-len(lead.prompt) // self.page_size) - len(shared)
                copies = (len(seqs) - 1) * bool(len(lead.prompt) % self.page_size)
                pages = self._allocate(need, spare=copies, keep=lead)
                if pages is None:
                    self.pool.release(shared)
                    return
                self._waiting.popleft()
                lead.pages, lead.prefilled = shared + pages, len(shared) * self.page_size
                self.stats.prefix_hit_tokens += lead.prefilled
            for seq, slot in zip(seqs, free):
                seq.slot, seq.order = slot, next(self._orders)
                self._slot_seq[slot] = seq
            self._prefilling.append(item)

    def _allocate(self, count: int, spare: int = 0, keep: _Sequence | None = None
                  ) -> list[int] | None:
        """``count`` pages (leaving ``spare`` more free), evicting idle samples' pages
        (not ``keep``'s) first when the pool is short; None when it cannot."""
        while self.pool.available() < count + spare and self._evict_held(keep):
            pass
        return self.pool.allocate(count) if self.pool.available() >= count + spare else None

    def _evict_held(self, keep: _Sequence | None = None) -> bool:
        """Free the pages of an idle sample that still has some: the longest-held, else
        the last resumed one still queued (either prefills its history again when it
        runs); whether there was one."""
        queued = [seq for item in self._waiting for seq in _samples(item)]
        for seq in [*self._held.values(), *reversed(queued)]:
            if seq.pages and seq is not keep:
                self.pool.release(seq.pages)
                seq.pages, seq.prefilled = [], 0
                self.stats.preemptions += 1
                return True
        return False

    def _table(self, seqs: Sequence[_Sequence | None], width: int) -> np.ndarray:
        table = np.zeros((len(seqs), width), np.int32)
        for row, seq in enumerate(seqs):
            if seq is not None:
                pages = seq.pages[:width]
                table[row, : len(pages)] = pages
        return table

    def _prefill_round(self) -> list[Completion]:
        rows = []  # (item, lead, start, count)
        budget = self.prefill_tokens
        for item in self._prefilling:
            lead = _samples(item)[0]
            count = min(len(lead.prompt) - lead.prefilled, self.prefill_chunk)
            if rows and count > budget:
                break
            rows.append((item, lead, lead.prefilled, count))
            budget -= count
        chunk = _pow2(max(r[3] for r in rows), 16)
        num_rows = min(_pow4(len(rows)), _pow2(self.slots))
        width = _pow2(-(-max(r[2] + chunk for r in rows) // self.page_size))
        ids = np.zeros((num_rows, chunk), np.int32)
        start = np.zeros(num_rows, np.int32)
        count = np.zeros(num_rows, np.int32)
        for row, (_, lead, begin, n) in enumerate(rows):
            ids[row, :n] = lead.prompt[begin : begin + n]
            start[row], count[row] = begin, n
        table = self._table([r[1] for r in rows] + [None] * (num_rows - len(rows)), width)
        logits_rv, self._pages = _prefill(
            self._graph, self.state, self._pages, table, ids, start, count,
            page_size=self.page_size, layout=self.layout,
        )
        self.stats.prefill_tokens += int(count.sum())
        done = []
        for row, (item, lead, begin, n) in enumerate(rows):
            lead.prefilled = begin + n
            if lead.prefilled == len(lead.prompt):
                done.append((row, item))
        return self._start_samples(logits_rv, done) if done else []

    def _start_samples(self, logits_rv, done) -> list[Completion]:
        """Fork each finished prompt to its samples and draw their first tokens."""
        starting: list[tuple[int, _Sequence]] = []
        copies: list[tuple[int, int]] = []
        for row, item in done:
            if item not in self._prefilling:  # put back to free pages for another's copies
                continue
            self._prefilling.remove(item)
            seqs = _samples(item)
            lead = seqs[0]
            self.pool.register(lead.prompt, lead.pages)
            full = len(lead.prompt) // self.page_size
            partial = len(lead.pages) > full
            for seq in seqs[1:]:
                self.pool.share(lead.pages[:full])
                seq.pages = list(lead.pages[:full])
                if partial:  # the last, partly filled prompt page: a copy of its own
                    own = self._take_pages(1, protect=seq)
                    seq.pages += own
                    copies.append((lead.pages[full], own[0]))
                seq.prefilled = len(seq.prompt)
            for seq in seqs:
                starting.append((row, seq))
        if copies:
            m = _pow2(len(copies))
            source = np.zeros(m, np.int32)
            target = np.zeros(m, np.int32)
            source[: len(copies)], target[: len(copies)] = zip(*copies)
            self._pages = _copy_pages(self._pages, source, target)
        n = _pow2(self.slots)  # at most one start per slot: one program
        source = np.zeros(n, np.int32)
        keys = np.zeros((n, *self._keys.shape[1:]), np.uint32)
        index = np.zeros(n, np.int32)
        for i, (row, seq) in enumerate(starting):
            source[i], keys[i], index[i] = row, seq.key_data, len(seq.completion.tokens)
        picked = jax.device_get(_first_tokens(logits_rv, source, keys, index, config=self.config))
        changed = []
        for i, (_, seq) in enumerate(starting):
            token = int(picked[0][i])
            self._record(seq, token, *(float(x[i]) for x in picked[1:]))
            slot = seq.slot
            self._token[slot], self._pos[slot] = token, len(seq.prompt)
            self._index[slot] = len(seq.completion.tokens)
            self._budget[slot], self._keys[slot] = seq.budget, seq.key_data
            self._set_recent(seq)
            if self._ended(seq):
                self._finish(seq)
            changed.append(seq.completion)
        return changed

    def _set_recent(self, seq) -> None:
        """The last generated tokens of ``seq`` in its slot's stop-sequence window."""
        tail = seq.completion.tokens[-self._window :]
        self._recent[seq.slot] = -1
        self._recent[seq.slot, self._window - len(tail) :] = tail

    def _record(self, seq, token, logprob, model_lp, policy_lp):
        c = seq.completion
        c.tokens.append(token)
        c.logprobs.append(logprob)
        c.model_logprobs.append(model_lp)
        c.policy_logprobs.append(policy_lp)

    def _ended(self, seq) -> bool:
        tokens = seq.completion.tokens
        if tokens[-1] in self._eos or any(
            len(tokens) >= len(s) and tuple(tokens[-len(s) :]) == s for s in self._stops
        ):
            seq.completion.finish_reason = "stop"
        elif len(tokens) >= seq.budget:
            seq.completion.finish_reason = "length"
        return seq.completion.finished

    def _finish(self, seq) -> None:
        if seq.hold and seq.completion.finish_reason in ("stop", "length"):
            self._held[(seq.completion.request_id, seq.completion.sample)] = seq
        else:
            self.pool.release(seq.pages)
            seq.pages = []
        self._slot_seq[seq.slot] = None
        seq.slot = None

    def _take_pages(self, count: int, protect: _Sequence) -> list[int]:
        """``count`` pages, preempting the newest other decoding samples until they fit."""
        while True:
            pages = self._allocate(count, keep=protect)
            if pages is not None:
                return pages
            victims = [s for s in self._slot_seq
                       if s is not None and s is not protect and s.prefilled == len(s.prompt)
                       and s.completion.tokens]
            if victims:
                self._preempt(max(victims, key=lambda s: s.order))
                continue
            waiting = [item for item in self._prefilling if protect not in _samples(item)]
            if not waiting:
                raise self._pool_too_small("one sequence")
            self._unadmit(waiting[-1])

    def _pool_too_small(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"the KV pool ({self.pool.num_pages} pages of {self.page_size}) cannot hold "
            f"{what}; give the engine more num_pages (or kv_tokens)"
        )

    def _unadmit(self, item) -> None:
        """Put a prompt still prefilling back at the head of the queue, pages freed."""
        self._prefilling.remove(item)
        for seq in _samples(item):
            self.pool.release(seq.pages)
            seq.pages, seq.prefilled = [], 0
            self._slot_seq[seq.slot], seq.slot = None, None
        self._waiting.appendleft(item)

    def _preempt(self, seq: _Sequence) -> None:
        """Free ``seq``'s slot and pages; it is requeued first, to prefill again with what
        it has generated so far (all but its last token, which it then continues from)."""
        self.stats.preemptions += 1
        self.pool.release(seq.pages)
        seq.pages = []
        self._slot_seq[seq.slot], seq.slot = None, None
        c = seq.completion
        # Its last token is not in the cache yet: prefilling the rest gives the logits that
        # drew it, so it is dropped and drawn again (the same key: the same token).
        for values in (c.tokens, c.logprobs, c.model_logprobs, c.policy_logprobs):
            values.pop()
        prompt = seq.prompt[: seq.prompt_len] + c.tokens
        self._waiting.appendleft(
            _Sequence(c, prompt, seq.budget, seq.key_data, seq.prompt_len, hold=seq.hold)
        )

    def _ensure_pages(self, lookahead: int) -> None:
        """Every decoding sample holds the pages for its next ``lookahead`` tokens."""
        for seq in sorted((s for s in self._slot_seq if s is not None), key=lambda s: s.order):
            if seq.slot is None or seq.prefilled < len(seq.prompt):
                continue
            last = min(self._pos[seq.slot] + lookahead, seq.prompt_len + seq.budget) - 1
            need = last // self.page_size + 1 - len(seq.pages)
            if need > 0:
                seq.pages += self._take_pages(need, protect=seq)

    def _decode_round(self) -> list[Completion]:
        steps = self.steps_per_call
        self._ensure_pages(steps)
        seqs = self._slot_seq
        active = np.array([s is not None and s.prefilled == len(s.prompt) for s in seqs])
        if not active.any():
            return []
        # Only the decoding rows run, in a bucket of rows (a step's cost grows with its
        # rows: when few are left, as at the end of a batch, steps get cheaper).
        slots_r = np.flatnonzero(active)
        rows = min(_pow2(len(slots_r), 8), _pow2(self.slots))
        pick = np.zeros(rows, np.int64)
        pick[: len(slots_r)] = slots_r
        live_r = np.arange(rows) < len(slots_r)
        width = _pow2(max(len(seqs[i].pages) for i in slots_r))
        table = self._table([seqs[i] for i in slots_r] + [None] * (rows - len(slots_r)), width)
        waiting = sum(len(_samples(w)) for w in self._waiting)
        exit_after = max(1, min(waiting, self.join_batch)) if waiting else self.slots + 1
        self._pages, out, ran = _decode(
            self._graph, self.state, self._pages, table, self._token[pick], self._pos[pick],
            self._index[pick], self._budget[pick], self._keys[pick], live_r,
            self._recent[pick], self._eos_e, np.int32(exit_after), config=self.config,
            steps=steps, page_size=self.page_size, layout=self.layout, stops=self._stops,
        )
        tokens, logprobs, model_lps, policy_lps = jax.device_get(out)
        ran = int(ran)
        self.stats.decode_calls += 1
        self.stats.decode_steps += ran
        changed = []
        for r, slot in enumerate(slots_r):
            seq = seqs[slot]
            for j in range(ran):
                self._record(seq, int(tokens[r, j]), float(logprobs[r, j]),
                             float(model_lps[r, j]), float(policy_lps[r, j]))
                self._token[slot] = tokens[r, j]
                self._pos[slot] += 1
                self._index[slot] += 1
                if self._ended(seq):
                    self._finish(seq)
                    break
            if seq.slot is not None:
                self._set_recent(seq)
            changed.append(seq.completion)
        return changed


def completions_to_arrays(completions: Sequence[Completion], width: int,
                          pad_token_id: int = 0) -> SampleArrays:
    """Completions as the padded numpy ``SampleArrays`` the static sampler returns."""
    rows = len(completions)
    tokens = np.full((rows, width), pad_token_id, np.int32)
    lps = [np.zeros((rows, width), np.float32) for _ in range(3)]
    for r, c in enumerate(completions):
        n = len(c.tokens)
        tokens[r, :n] = c.tokens
        for buf, values in zip(lps, (c.logprobs, c.model_logprobs, c.policy_logprobs)):
            buf[r, :n] = values
    finished = np.array([c.finish_reason == "stop" for c in completions])
    return SampleArrays(
        tokens_bn=tokens, logprobs_bn=lps[0], model_logprobs_bn=lps[1],
        policy_logprobs_bn=lps[2],
        lengths_b=np.array([len(c.tokens) for c in completions], np.int32),
        finished_b=finished, truncated_b=~finished,
    )


_ENGINES: dict = {}  # the last engine per geometry: its pool and programs are reused


def engine_for(graphdef, state, config: SamplingConfig, *, rows: int, max_seq_len: int,
               max_slots: int = 64) -> Engine:
    """An idle engine for ``rows`` samples of up to ``max_seq_len`` tokens with these
    weights, reusing the pool of the last one of the same geometry (bucketed, so
    calls of similar sizes share it and its compiled programs)."""
    slots = min(_pow2(rows), max_slots)
    max_seq_len = _pow2(max_seq_len, 64)
    geometry = (_StaticGraph(graphdef), config, slots, max_seq_len)
    engine = _ENGINES.pop(geometry, None)
    if engine is None or engine.pending() or engine.held():
        _ENGINES.clear()  # one pool at a time: its memory is the whole KV budget
        engine = Engine((graphdef, state), config, slots=slots, max_seq_len=max_seq_len)
    else:
        engine.set_weights(state)
        engine.stats = EngineStats()
    _ENGINES[geometry] = engine
    return engine


def generate_paged(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   config: SamplingConfig, rng, *, rows: int | None = None,
                   max_prompt_len: int | None = None) -> list[Completion]:
    """``config.num_samples`` completions of each prompt through the engine; row
    ``i * n + j`` draws from ``fold_in(rng, i * n + j)`` as the static sampler's does.
    ``model`` is a module or ``(graphdef, state)``. ``rows`` and ``max_prompt_len`` size
    the engine (default: these prompts'); a caller with a fixed layout passes its own, so
    every batch reuses one engine."""
    graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
    n = config.num_samples
    rows = rows or len(prompts) * n
    max_prompt_len = max_prompt_len or max(map(len, prompts))
    engine = engine_for(graphdef, state, config, rows=rows,
                        max_seq_len=max_prompt_len + max_new_tokens)
    keys = sample_key_data(rng, len(prompts) * n)
    for i, prompt in enumerate(prompts):
        for j in range(0, n, engine.slots):  # more samples than slots: in groups
            group = min(n - j, engine.slots)
            engine.add(prompt, max_new_tokens, keys[i * n + j : i * n + j + group], n=group)
    return engine.run()
