"""The server's engine loop: one thread owns the continuous-batching engines and every
request the HTTP handlers submit joins their running batches.

Handlers never touch an engine: ``submit`` queues a request and returns a ``Ticket`` whose
events (new tokens of each sample, then its finish reason) arrive on a thread-safe queue;
``Ticket.cancel`` (a client that left, a stop string found in the text) frees the
request's slots and pages at the loop's next round. Requests with the same sampling
settings share one engine (its temperature and filters are compiled in); the loop steps
each engine with work in turn. ``set_weights`` swaps in new weights between rounds (a
trainer serving its live policy).
"""

from __future__ import annotations

import dataclasses
import queue
import threading

import jax
from flax import nnx

from jaxpt.sampling import Engine, SamplingConfig


@dataclasses.dataclass
class Event:
    """New tokens of sample ``sample`` (with their raw-model log-probs); ``finish_reason``
    is set on a sample's last event ("stop", "length" or "cancelled")."""

    sample: int
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None = None


class Ticket:
    """A submitted request: read ``events`` until every sample has finished."""

    def __init__(self, loop: EngineLoop, n: int):
        self.events: queue.Queue = queue.Queue()
        self.n = n
        self._loop = loop
        self.engine_key = None
        self.request_id = None
        self.n_done = 0  # samples finished (the loop's count)
        self.sent = [0] * n  # tokens of each sample already delivered

    def cancel(self) -> None:
        self._loop._inbox.put(("cancel", self))


class EngineLoop:
    """Serves ``model`` (a module or ``(graphdef, state)``) through continuous-batching
    engines on a background thread.

    ``slots`` rows decode together per engine; ``max_seq_len`` bounds prompt + reply;
    ``engine_options`` go to each ``Engine`` (``page_size``, ``kv_tokens`` or
    ``num_pages``, ``steps_per_call``).
    """

    def __init__(self, model, eos_ids, *, slots: int = 64, max_seq_len: int = 4096,
                 **engine_options):
        self.graphdef, self.state = model if isinstance(model, tuple) else nnx.split(model)
        self.eos_ids = tuple(int(t) for t in eos_ids)
        self.slots, self.max_seq_len = slots, max_seq_len
        self.engine_options = engine_options
        self._engines: dict[SamplingConfig, Engine] = {}
        self._tickets: dict[tuple, Ticket] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="jaxpt-engine-loop", daemon=True)
        self._thread.start()

    # -- handler side
    def submit(self, prompt_ids, max_tokens: int, *, temperature: float,
               top_p: float | None = None, seed: int = 0, n: int = 1) -> Ticket:
        config = SamplingConfig.make(temperature=temperature, top_p=top_p,
                                     eos_token_id=self.eos_ids)
        ticket = Ticket(self, n)
        self._inbox.put(("add", ticket, config, list(prompt_ids), max_tokens, seed))
        return ticket

    def set_weights(self, state) -> None:
        """Serve new weights (same structure) from the next round on."""
        self._inbox.put(("weights", state))

    def busy_slots(self) -> int:
        """Slots holding a request right now, over every engine (a snapshot)."""
        return sum(engine.busy_slots() for engine in list(self._engines.values()))

    # -- loop side
    def _engine(self, config: SamplingConfig) -> Engine:
        if config not in self._engines:
            self._engines[config] = Engine(
                (self.graphdef, self.state), config, slots=self.slots,
                max_seq_len=self.max_seq_len, **self.engine_options
            )
        return self._engines[config]

    def _handle(self, message) -> None:
        kind = message[0]
        if kind == "add":  # the engine loop's only entry for new work
            _, ticket, config, prompt, max_tokens, seed = message
            try:
                engine = self._engine(config)
                request_id = engine.add(prompt, max_tokens, jax.random.key(seed), n=ticket.n)
            except Exception as error:  # noqa: BLE001 - the request fails, the loop serves on
                ticket.events.put(error)
                return
            ticket.engine_key, ticket.request_id = config, request_id
            self._tickets[(config, request_id)] = ticket
        elif kind == "cancel":
            ticket = message[1]
            key = (ticket.engine_key, ticket.request_id)
            if ticket.request_id is not None and key in self._tickets:
                self._engines[ticket.engine_key].cancel(ticket.request_id)
                del self._tickets[key]
        elif kind == "weights":
            self.state = message[1]
            for engine in self._engines.values():
                engine.set_weights(self.state)

    def _run(self) -> None:
        while True:
            busy = any(engine.pending() for engine in self._engines.values())
            try:  # wait for work when idle; otherwise take what has arrived
                message = self._inbox.get(block=not busy, timeout=None)
                self._handle(message)
                while True:
                    self._handle(self._inbox.get_nowait())
            except queue.Empty:
                pass
            for config, engine in list(self._engines.items()):
                if not engine.pending():
                    continue
                try:
                    changed = engine.step()
                except Exception as error:  # noqa: BLE001 - every waiting client hears it
                    self._fail(config, error)
                    continue
                for completion in changed:
                    self._deliver(config, completion)

    def _deliver(self, config, completion) -> None:
        key = (config, completion.request_id)
        ticket = self._tickets.get(key)
        if ticket is None:  # cancelled meanwhile
            return
        sent = ticket.sent[completion.sample]
        ticket.events.put(Event(completion.sample, completion.tokens[sent:],
                                completion.model_logprobs[sent:], completion.finish_reason))
        ticket.sent[completion.sample] = len(completion.tokens)
        if completion.finished:
            ticket.n_done += 1
            if ticket.n_done == ticket.n:
                del self._tickets[key]

    def _fail(self, config, error) -> None:
        """An engine failed: its requests end with the error and it is rebuilt."""
        for key in [k for k in self._tickets if k[0] == config]:
            self._tickets.pop(key).events.put(error)
        self._engines.pop(config, None)
