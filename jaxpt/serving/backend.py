"""What the server generates with: one model, its tokenizer and stop ids, and the engine
loop every request joins.

Replies come from the continuous-batching engine (``jaxpt.serving.scheduler``): concurrent
requests decode together, a request's ``n`` samples share one prefill, and a served greedy
reply is the reply ``generate`` gives (the same engine and arithmetic).
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.sampling.api import bucket
from jaxpt.sampling.engine import _merge, _StaticGraph
from jaxpt.serving.protocol import Choice, Request, RequestError
from jaxpt.serving.scheduler import EngineLoop


@functools.partial(jax.jit, static_argnames=("graph", "k"))
def _top_logprobs(graph, state, ids_bt, k):
    """Temperature-1 log-probs of each next token: the ``k`` best (values, ids) per position."""
    logits = _merge(graph.graphdef, state)(ids_bt)
    return jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first of ``stops`` (excluded, as the OpenAI API returns it)."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


@dataclasses.dataclass
class Piece:
    """What one engine event adds to streamed choice ``index``: text ready to send, the
    tokens it came from, the finish reason on the choice's last piece, and (when asked)
    the tokens' log-probs."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: Choice | None = None


class Backend:
    """Generation for the server: ``complete`` for whole replies, ``stream`` for streamed
    ones. ``model`` is a module or ``(graphdef, state)`` (``state`` may be a tuple of
    states, as a trainer holds them). ``max_tokens_limit`` caps a request's ``max_tokens``; ``slots``,
    ``max_seq_len`` and ``engine_options`` (``page_size``, ``num_pages``...) shape the
    engines (see ``EngineLoop``)."""

    def __init__(self, model, tokenizer, eos_ids, *, model_name: str,
                 max_tokens_limit: int = 4096, slots: int = 32, max_seq_len: int | None = None,
                 **engine_options):
        self.tokenizer, self.eos_ids = tokenizer, list(eos_ids)
        self.model_name, self.max_tokens_limit = model_name, max_tokens_limit
        graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
        # The module as first served (the live weights are the engine loop's).
        self.model = _merge(graphdef, state) if isinstance(model, tuple) else model
        config = self.model.config
        self.vocab_size = config.vocab_size
        self.context = config.max_position_embeddings
        self.max_seq_len = min(max_seq_len or self.context, self.context)
        self.loop = EngineLoop(model, self.eos_ids, slots=slots, max_seq_len=self.max_seq_len,
                               **engine_options)

    # -- prompts -------------------------------------------------------------------------

    def encode_chat(self, messages, tools=None) -> list[int]:
        from jaxpt.data import encode_prompt

        return encode_prompt(self.tokenizer, messages, tools=tools)

    def encode_text(self, text: str) -> list[int]:
        from jaxpt.data import encode_prompt

        return encode_prompt(self.tokenizer, text, chat_template=False)

    def check(self, request: Request) -> None:
        """A ``RequestError`` when ``request`` does not fit the model's context."""
        self._sampling(request)

    def _sampling(self, request: Request) -> dict:
        if len(request.prompt_ids) + request.max_tokens > self.max_seq_len:
            raise RequestError(
                f"the prompt ({len(request.prompt_ids)} tokens) plus 'max_tokens' "
                f"({request.max_tokens}) exceed the server's context of "
                f"{self.max_seq_len} tokens"
            )
        return {"temperature": request.temperature, "top_p": request.top_p,
                "seed": request.seed, "n": request.n}

    def _submit(self, request: Request):
        return self.loop.submit(request.prompt_ids, request.max_tokens, **self._sampling(request))

    def _text(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- whole replies -------------------------------------------------------------------

    def complete(self, request: Request) -> list[Choice]:
        ticket = self._submit(request)
        tokens = [[] for _ in range(request.n)]
        logprobs = [[] for _ in range(request.n)]
        reasons: list[str | None] = [None] * request.n
        while None in reasons:
            event = ticket.events.get()
            if isinstance(event, Exception):
                raise event
            tokens[event.sample] += event.tokens
            logprobs[event.sample] += event.logprobs
            if event.finish_reason is not None:
                reasons[event.sample] = event.finish_reason
            elif request.stop and cut_at_stop(self._text(tokens[event.sample]), request.stop)[1]:
                reasons[event.sample] = "stop"  # its text is final: stop sampling it
                if None not in reasons:
                    ticket.cancel()
        choices = []
        for sample_tokens, sample_logprobs, reason in zip(tokens, logprobs, reasons):
            text, stopped = cut_at_stop(self._text(sample_tokens), request.stop)
            if stopped:  # keep the tokens of the text returned (and the stop's own)
                reason = "stop"
            choice = Choice(text=text, token_ids=list(sample_tokens), finish_reason=reason)
            if request.logprobs:
                self._add_logprobs(choice, request, list(sample_logprobs))
            choices.append(choice)
        return choices

    def _add_logprobs(self, choice: Choice, request: Request, logprobs: list[float]) -> None:
        choice.token_texts = [self.tokenizer.decode([t]) for t in choice.token_ids]
        choice.logprobs = [float(v) for v in logprobs]
        if not request.top_logprobs or not choice.token_ids:
            return
        ids = request.prompt_ids + choice.token_ids
        padded = np.zeros((1, bucket(len(ids))), np.int32)
        padded[0, : len(ids)] = ids  # right padding: causal attention never reads it
        values, top_ids = _top_logprobs(_StaticGraph(self.loop.graphdef), self.loop.state,
                                        jnp.asarray(padded), request.top_logprobs)
        first = len(request.prompt_ids) - 1  # the position that predicts the first token
        values = np.asarray(values[0, first : first + len(choice.token_ids)])
        top_ids = np.asarray(top_ids[0, first : first + len(choice.token_ids)])
        choice.top = [[(self.tokenizer.decode([int(t)]), float(v)) for t, v in zip(ti, vi)]
                      for ti, vi in zip(top_ids, values)]

    # -- one streamed reply --------------------------------------------------------------

    def stream(self, request: Request, cancelled: threading.Event) -> Iterator[Piece]:
        """``Piece``s of the ``n`` replies as their tokens come; each reply's last piece has
        a finish reason. Once ``cancelled`` is set (the client went away) the request
        leaves the engine, freeing its slots and pages."""
        ticket = self._submit(request)
        hold = max((len(s) for s in request.stop), default=1) - 1  # a stop may be starting
        tokens: list[list[int]] = [[] for _ in range(request.n)]
        sent = [0] * request.n
        open_choices = set(range(request.n))
        try:
            while open_choices:
                try:
                    event = ticket.events.get(timeout=0.1)
                except queue.Empty:
                    if cancelled.is_set():
                        return
                    continue
                if cancelled.is_set():
                    return
                if isinstance(event, Exception):
                    raise event
                i = event.sample
                if i not in open_choices:  # ended by a stop string already
                    continue
                tokens[i] += event.tokens
                logprobs = None
                if request.logprobs:
                    logprobs = Choice(text="", token_ids=list(event.tokens), finish_reason="",
                                      token_texts=[self.tokenizer.decode([t]) for t in event.tokens],
                                      logprobs=[float(v) for v in event.logprobs])
                text = self._text(tokens[i])
                cut, stopped = cut_at_stop(text, request.stop)
                finish = "stop" if stopped else event.finish_reason
                if finish is not None:
                    open_choices.discard(i)
                    yield Piece(i, (cut if stopped else text)[sent[i]:], event.tokens, finish,
                                logprobs)
                    continue
                ready = len(text) - hold
                if text.endswith("\ufffd"):  # a character split across tokens
                    ready = min(ready, len(text) - 1)
                piece = text[sent[i]:ready] if ready > sent[i] else ""
                sent[i] = max(sent[i], ready)
                yield Piece(i, piece, event.tokens, None, logprobs)
        finally:
            ticket.cancel()  # a no-op once the request has finished
