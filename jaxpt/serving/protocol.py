"""The OpenAI chat/completions request and response shapes, as plain functions.

``parse_chat`` and ``parse_completion`` turn a request body into a ``Request`` (token ids
in, sampling settings, what to return) or raise ``RequestError`` naming the field;
``response`` and ``chunk`` build the JSON the official client reads. Nothing
here touches a model, so every rule is checked without one.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence
from typing import Any

MAX_N = 16
MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit for chat
MAX_COMPLETION_LOGPROBS = 5  # and for the legacy completions endpoint


class RequestError(ValueError):
    """A request the server refuses (HTTP 400); the message names the field."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request: the prompt as token ids and everything that shapes the reply."""

    kind: str  # "chat" or "completion"
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    n: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    logprobs: bool
    top_logprobs: int
    echo_token_ids: bool  # the token-out extension: the reply's and prompt's ids come back


def _field(body: dict, name: str, kind, default, *, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RequestError(f"'{name}' must be {kind.__name__}, got {value!r}")
    if low is not None and value < low or high is not None and value > high:
        raise RequestError(f"'{name}' must be in [{low}, {high}], got {value!r}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(
        isinstance(s, str) and s for s in stop
    ):
        raise RequestError("'stop' must be a non-empty string or a list of up to 4 of them")
    return tuple(stop)


def _common(body: dict, max_tokens_limit: int) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return {
        "max_tokens": _field({"max_tokens": max_tokens}, "max_tokens", int, 16, low=1,
                             high=max_tokens_limit),
        "temperature": _field(body, "temperature", float, 1.0, low=0.0, high=2.0),
        "top_p": (None if body.get("top_p") in (None, 1, 1.0)
                  else _field(body, "top_p", float, 1.0, low=0.0, high=1.0)),
        "n": _field(body, "n", int, 1, low=1, high=MAX_N),
        "seed": _field(body, "seed", int, 0),
        "stop": _stop(body),
        "stream": _field(body, "stream", bool, False),
        "echo_token_ids": _field(body, "return_token_ids", bool, False),
    }


def _check_stream(settings: dict, top_logprobs: int) -> None:
    if settings["stream"] and top_logprobs:
        raise RequestError("'top_logprobs' with 'stream' is not supported by this server "
                           "(the sampled tokens' 'logprobs' are)")


def _token_ids(value, name: str, vocab_size: int) -> list[int]:
    if not value or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"'{name}' must be a non-empty list of token ids")
    bad = next((t for t in value if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"'{name}' holds {bad}, outside the vocabulary [0, {vocab_size})")
    return list(value)


def parse_chat(body: Any, encode, *, vocab_size: int, max_tokens_limit: int) -> Request:
    """A ``/v1/chat/completions`` body as a ``Request``. ``encode(messages, tools)`` renders
    the conversation through the model's chat template (a ``prompt_token_ids`` field, the
    token-in extension, is taken as is instead)."""
    settings = _common(body, max_tokens_limit)
    top = _field(body, "top_logprobs", int, 0, low=0, high=MAX_TOP_LOGPROBS)
    settings["logprobs"] = _field(body, "logprobs", bool, False) or top > 0
    _check_stream(settings, top)
    if body.get("prompt_token_ids") is not None:
        prompt_ids = _token_ids(body["prompt_token_ids"], "prompt_token_ids", vocab_size)
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise RequestError(f"'messages[{i}]' must be an object with a 'role'")
            content = message.get("content")
            if isinstance(content, list):  # content parts: the text ones, joined
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise RequestError(f"'messages[{i}].content': only text parts are served")
                message["content"] = "".join(str(p.get("text", "")) for p in content)
            elif content is not None and not isinstance(content, str):
                raise RequestError(f"'messages[{i}].content' must be a string or text parts")
        tools = body.get("tools")
        if tools is not None and not (isinstance(tools, list)
                                      and all(isinstance(t, dict) for t in tools)):
            raise RequestError("'tools' must be a list of tool objects")
        try:
            prompt_ids = encode(messages, tools)
        except (ValueError, TypeError, KeyError) as error:  # the template refused them
            raise RequestError(f"'messages': {error}") from None
    return Request(kind="chat", prompt_ids=prompt_ids, top_logprobs=top, **settings)


def parse_completion(body: Any, encode, *, vocab_size: int, max_tokens_limit: int) -> Request:
    """A ``/v1/completions`` body as a ``Request``: ``prompt`` is one string (``encode(text)``
    gives its ids) or one list of token ids, as the OpenAI API allows."""
    settings = _common(body, max_tokens_limit)
    top = _field(body, "logprobs", int, None, low=0, high=MAX_COMPLETION_LOGPROBS)
    settings["logprobs"] = top is not None
    _check_stream(settings, top or 0)
    if _field(body, "echo", bool, False):
        raise RequestError("'echo' is not supported by this server")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        prompt_ids = encode(prompt)
    elif isinstance(prompt, list):
        prompt_ids = _token_ids(prompt, "prompt", vocab_size)
    else:
        raise RequestError("'prompt' must be a non-empty string or one list of token ids")
    return Request(kind="completion", prompt_ids=prompt_ids, top_logprobs=top or 0, **settings)


# -------------------------------------------------------------------- responses


@dataclasses.dataclass
class Choice:
    """One finished reply: its text, token ids, finish reason and (when asked) log-probs;
    ``top`` holds, per token, ``[(token text, log-prob), ...]`` best first."""

    text: str
    token_ids: list[int]
    finish_reason: str
    token_texts: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[list[tuple[str, float]]] = dataclasses.field(default_factory=list)


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def _usage(request: Request, choices: Sequence[Choice]) -> dict:
    completion = sum(len(c.token_ids) for c in choices)
    prompt = len(request.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _chat_logprobs(choice: Choice) -> dict:
    return {"content": [
        {"token": text, "logprob": lp, "bytes": list(text.encode()),
         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                          for t, v in (choice.top[i] if choice.top else [])]}
        for i, (text, lp) in enumerate(zip(choice.token_texts, choice.logprobs))
    ]}


def _completion_logprobs(choice: Choice) -> dict:
    offsets, at = [], 0
    for text in choice.token_texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": choice.token_texts, "token_logprobs": choice.logprobs,
            "top_logprobs": [dict(top) for top in choice.top] if choice.top else None,
            "text_offset": offsets}


def response(request: Request, model_name: str, choices: Sequence[Choice]) -> dict:
    """The whole (non-streamed) reply to ``request``."""
    out = []
    for i, choice in enumerate(choices):
        if request.kind == "chat":
            item = {"index": i, "finish_reason": choice.finish_reason,
                    "message": {"role": "assistant", "content": choice.text},
                    "logprobs": _chat_logprobs(choice) if request.logprobs else None}
        else:
            item = {"index": i, "finish_reason": choice.finish_reason, "text": choice.text,
                    "logprobs": _completion_logprobs(choice) if request.logprobs else None}
        if request.echo_token_ids:
            item["token_ids"] = choice.token_ids
        out.append(item)
    body = {
        "id": new_id(request.kind),
        "object": "chat.completion" if request.kind == "chat" else "text_completion",
        "created": int(time.time()), "model": model_name, "choices": out,
        "usage": _usage(request, choices),
    }
    if request.echo_token_ids:
        body["prompt_token_ids"] = request.prompt_ids
    return body


def chunk(request: Request, model_name: str, stream_id: str, *, text: str | None = None,
          token_ids: Sequence[int] = (), finish_reason: str | None = None,
          first: bool = False, index: int = 0, logprobs: Choice | None = None) -> dict:
    """One server-sent event of choice ``index`` of a streamed reply; ``logprobs`` holds
    the token texts and log-probs of the tokens this event carries (when asked for)."""
    if request.kind == "chat":
        delta: dict = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        lps = _chat_logprobs(logprobs) if logprobs is not None else None
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
                  "logprobs": lps}
        kind = "chat.completion.chunk"
    else:
        lps = _completion_logprobs(logprobs) if logprobs is not None else None
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason,
                  "logprobs": lps}
        kind = "text_completion"
    if request.echo_token_ids:
        choice["token_ids"] = list(token_ids)
    return {"id": stream_id, "object": kind, "created": int(time.time()),
            "model": model_name, "choices": [choice]}


def error_body(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
