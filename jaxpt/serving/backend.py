"""What the server generates with: one model, its tokenizer and stop ids, behind a lock.

Replies come from ``jaxpt.sampling.generate`` (whole replies, ``n`` samples from one
prefill) and ``jaxpt.sampling.stream.stream_tokens`` (streamed replies): the sampler every
other jaxpt path uses, so a served greedy reply is the reply ``generate`` gives. One
request samples at a time; the others wait their turn.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.sampling import generate
from jaxpt.sampling.api import bucket
from jaxpt.sampling.engine import _StaticGraph
from jaxpt.serving.protocol import Choice, Request, RequestError


@functools.partial(jax.jit, static_argnames=("graph", "k"))
def _top_logprobs(graph, state, ids_bt, k):
    """Temperature-1 log-probs of each next token: the ``k`` best (values, ids) per position."""
    logits = nnx.merge(graph.graphdef, state)(ids_bt)
    return jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first of ``stops`` (excluded, as the OpenAI API returns it)."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


class Backend:
    """Generation for the server: ``complete`` for whole replies, ``stream`` for one
    streamed reply. ``max_tokens_limit`` caps a request's ``max_tokens``."""

    def __init__(self, model, tokenizer, eos_ids, *, model_name: str,
                 max_tokens_limit: int = 4096):
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, list(eos_ids)
        self.model_name, self.max_tokens_limit = model_name, max_tokens_limit
        self.vocab_size = model.config.vocab_size
        self.lock = threading.Lock()

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
        if len(request.prompt_ids) + request.max_tokens > self.model.config.max_position_embeddings:
            raise RequestError(
                f"the prompt ({len(request.prompt_ids)} tokens) plus 'max_tokens' "
                f"({request.max_tokens}) exceed the model's context of "
                f"{self.model.config.max_position_embeddings} tokens"
            )
        return {"max_new_tokens": request.max_tokens, "temperature": request.temperature,
                "top_p": request.top_p, "eos_token_id": self.eos_ids, "seed": request.seed}

    def _stop_ids(self, stops) -> list[list[int]]:
        """Each stop string's tokens: the sampler stops on device when they come out as
        such; the text check catches a stop string tokenized another way."""
        ids = [list(self.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stops]
        return [seq for seq in ids if seq]

    def _text(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- whole replies -------------------------------------------------------------------

    def complete(self, request: Request) -> list[Choice]:
        sampling = self._sampling(request)
        with self.lock:
            out = generate(self.model, [request.prompt_ids], num_samples=request.n,
                           stop=self._stop_ids(request.stop) or None, **sampling)
            choices = []
            for tokens, logprobs, reason in zip(out.tokens, out.model_logprobs,
                                                out.finish_reasons):
                text, stopped = cut_at_stop(self._text(tokens), request.stop)
                if stopped:  # keep the tokens of the text returned (and the stop's own)
                    reason = "stop"
                choice = Choice(text=text, token_ids=list(tokens), finish_reason=reason)
                if request.logprobs:
                    self._add_logprobs(choice, request, list(logprobs))
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
        graphdef, state = nnx.split(self.model)
        values, top_ids = _top_logprobs(_StaticGraph(graphdef), state, jnp.asarray(padded),
                                        request.top_logprobs)
        first = len(request.prompt_ids) - 1  # the position that predicts the first token
        values = np.asarray(values[0, first : first + len(choice.token_ids)])
        top_ids = np.asarray(top_ids[0, first : first + len(choice.token_ids)])
        choice.top = [[(self.tokenizer.decode([int(t)]), float(v)) for t, v in zip(ti, vi)]
                      for ti, vi in zip(top_ids, values)]

    # -- one streamed reply --------------------------------------------------------------

    def stream(self, request: Request, cancelled: threading.Event) -> Iterator[tuple]:
        """``(text, token_ids, finish_reason)`` pieces of one reply as its tokens come;
        the last piece has a finish reason. Stops early, releasing the model, once
        ``cancelled`` is set (the client went away)."""
        from jaxpt.sampling.stream import stream_tokens

        sampling = self._sampling(request)
        hold = max((len(s) for s in request.stop), default=1) - 1  # a stop may be starting
        tokens: list[int] = []
        sent = 0
        with self.lock:
            for token in stream_tokens(self.model, request.prompt_ids, **sampling):
                if cancelled.is_set():
                    return
                tokens.append(int(token))
                text = self._text(tokens)
                cut, stopped = cut_at_stop(text, request.stop)
                if stopped:
                    yield cut[sent:], tokens[-1:], "stop"
                    return
                if token in self.eos_ids:
                    yield text[sent:], tokens[-1:], "stop"
                    return
                ready = len(text) - hold
                if text.endswith("\ufffd"):  # a character split across tokens
                    ready = min(ready, len(text) - 1)
                if ready > sent:
                    yield text[sent:ready], tokens[-1:], None
                    sent = ready
                else:
                    yield "", tokens[-1:], None
            text = self._text(tokens)
            yield text[sent:], [], "length"
