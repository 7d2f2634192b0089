"""Tool-call parsers: an assistant turn's text -> ``AssistantTurn`` (content and tool calls).

Each parser reads the format a family of chat templates renders, so a model trained with that
template writes it back:

- ``hermes`` (Qwen2.5, Qwen3, Hermes):
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, any number of them;
- ``llama3_json`` (Llama 3.1/3.2/3.3): the turn is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``, several separated by ``;``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "..."}]`` (tokenizers up to
  v3: Mistral 7B v0.3, Nemo) and ``[TOOL_CALLS]name[ARGS]{...}`` (v11 and later: Mistral Small
  3.2, Magistral, Devstral), with ``[CALL_ID]id`` before ``[ARGS]`` where the template has it.

What a parser expects: the turn's text decoded WITH special tokens kept
(``tokenizer.decode(ids, skip_special_tokens=False)``): ``[TOOL_CALLS]`` and ``<|python_tag|>``
are special tokens in real tokenizers and would vanish otherwise. The turn's end-of-turn token
(``<|im_end|>``, ``<|eot_id|>``, ``</s>``...) may end the text or not: parsers drop it.

A parser never raises on what the model wrote: a call it cannot read becomes an entry of
``parse_errors`` (the episode goes on with an error result) and is cut from ``content``.
``content`` is the text outside the calls, stripped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from jaxpt.envs.base import AssistantTurn, ToolCall

Parser = Callable[[str], AssistantTurn]

# The tokens that end a turn in each format, dropped from the end of ``content``.
_HERMES_ENDS = ("<|im_end|>", "<|endoftext|>")
_LLAMA3_ENDS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
_MISTRAL_ENDS = ("</s>",)
_DECODER = json.JSONDecoder()


def parse_hermes(text: str) -> AssistantTurn:
    """``<tool_call>{json}</tool_call>`` blocks. A last block left open still counts when its
    JSON is whole (``</tool_call>`` used as a stop string); else it is a parse error (a turn
    that ran out of tokens)."""
    calls, errors, outside = [], [], []
    position = 0
    for match in re.finditer(r"<tool_call>(.*?)(</tool_call>|\Z)", text, flags=re.DOTALL):
        outside.append(text[position : match.start()])
        position = match.end()
        body = match.group(1).strip()
        if not match.group(2):  # a stop string may have eaten "</tool_call>"; or cut short
            body = _strip_end_tokens(body, _HERMES_ENDS)
        call, error = _call_from_json(body, ("arguments", "parameters"))
        if error is not None and not match.group(2):
            error = f"unclosed <tool_call>: {error}"
        _collect(call, error, calls, errors)
    outside.append(text[position:])
    return _turn(text, "".join(outside), calls, errors, _HERMES_ENDS)


def parse_llama3_json(text: str) -> AssistantTurn:
    """Calls are the turn itself: JSON objects with "name" and "parameters" (or "arguments"),
    separated by ``;``, after ``<|python_tag|>`` when the model writes it. Without the tag, a
    turn that does not start with such an object is plain content (an answer may well start
    with "{"); with the tag, what follows must be calls."""
    tagged = "<|python_tag|>" in text
    before, _, region = text.partition("<|python_tag|>") if tagged else ("", "", text)
    calls, errors = [], []
    position = _skip_space(region, 0)
    if not tagged and not _starts_call(region, position):
        return _turn(text, text, [], [], _LLAMA3_ENDS)
    while position < len(region):
        obj, end, error = _decode_at(region, position)
        if error is not None:
            errors.append(error)
            position = len(region)
            break
        call, error = _call_from_object(obj, ("parameters", "arguments"))
        _collect(call, error, calls, errors)
        position = _skip_space(region, end)
        if not region.startswith(";", position):
            break  # what follows the calls (the end token, text) is content
        position = _skip_space(region, position + 1)
    return _turn(text, before + region[position:], calls, errors, _LLAMA3_ENDS)


def parse_mistral(text: str) -> AssistantTurn:
    """What follows each ``[TOOL_CALLS]``: a JSON list of calls, or ``name[ARGS]{json}``
    (``name[CALL_ID]id[ARGS]{json}``)."""
    pieces = text.split("[TOOL_CALLS]")
    content, calls, errors = [pieces[0]], [], []
    for piece in pieces[1:]:
        position = _skip_space(piece, 0)
        if piece.startswith("[", position) and not piece.startswith("[ARGS]", position):
            obj, end, error = _decode_at(piece, position)
            if error is None and not isinstance(obj, list):
                error = f"expected a JSON list of calls after [TOOL_CALLS], got {_excerpt(piece)}"
            if error is not None:
                errors.append(error)
                continue
            for item in obj:
                call, error = _call_from_object(item, ("arguments", "parameters"))
                _collect(call, error, calls, errors)
            content.append(piece[end:])
            continue
        match = re.match(r"\s*([\w.\-]+)\s*(?:\[CALL_ID\]\s*(\w+)\s*)?\[ARGS\]", piece)
        if match is None:
            errors.append(f"expected name[ARGS]{{...}} after [TOOL_CALLS], got {_excerpt(piece)}")
            continue
        obj, end, error = _decode_at(piece, _skip_space(piece, match.end()))
        if error is None:
            error = _arguments_problem(obj)
        if error is not None:
            errors.append(f"{match.group(1)}: {error}")
            continue
        calls.append(ToolCall(match.group(1), obj, match.group(2)))
        content.append(piece[end:])
    return _turn(text, "".join(content), calls, errors, _MISTRAL_ENDS)


PARSERS: dict[str, Parser] = {
    "hermes": parse_hermes,
    "llama3_json": parse_llama3_json,
    "mistral": parse_mistral,
}


def parser_for(chat_template: str | None, name: str = "auto") -> Parser:
    """The parser for a chat template: by ``name`` (``PARSERS``), or with "auto" by the call
    format the template renders: ``[TOOL_CALLS]`` -> mistral, ``<tool_call>`` -> hermes,
    ``<|python_tag|>`` or Llama's instruction ``{"name": function name, "parameters": dictionary
    of argument name and its value}`` (Llama 3.2 has no tag) -> llama3_json, else hermes."""
    if name != "auto":
        if name not in PARSERS:
            raise ValueError(
                f"unknown tool-call parser {name!r}: use one of {sorted(PARSERS)} or 'auto'"
            )
        return PARSERS[name]
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return parse_mistral
    if "<tool_call>" in template:
        return parse_hermes
    if "<|python_tag|>" in template or '"parameters": dictionary of argument' in template:
        return parse_llama3_json
    return parse_hermes


# --- helpers --------------------------------------------------------------------------------


def _turn(text: str, content: str, calls: list, errors: list, end_tokens: tuple) -> AssistantTurn:
    content = _strip_end_tokens(content, end_tokens)
    return AssistantTurn(text=text, content=content, tool_calls=calls, parse_errors=errors)


def _strip_end_tokens(text: str, end_tokens: tuple[str, ...]) -> str:
    text = text.strip()
    while text.endswith(end_tokens):
        text = text[: -len(next(t for t in end_tokens if text.endswith(t)))].rstrip()
    return text


def _collect(call: ToolCall | None, error: str | None, calls: list, errors: list) -> None:
    if call is not None:
        calls.append(call)
    else:
        errors.append(error)


def _call_from_json(
    body: str, argument_keys: tuple[str, ...]
) -> tuple[ToolCall | None, str | None]:
    obj, end, error = _decode_at(body, 0)
    if error is None and body[end:].strip():
        error = f"text after the call's JSON: {_excerpt(body[end:])}"
    if error is not None:
        return None, error
    return _call_from_object(obj, argument_keys)


def _call_from_object(
    obj: Any, argument_keys: tuple[str, ...]
) -> tuple[ToolCall | None, str | None]:
    """A call from ``{"name": str, <argument key>: {...} or a JSON string of one, "id"?}``."""
    if not isinstance(obj, dict):
        return None, f"a call must be a JSON object, got a JSON {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        keys = _excerpt(", ".join(str(key) for key in list(obj)[:10]))
        return None, f'a call needs a "name" string; it has keys {keys}'
    arguments = next((obj[key] for key in argument_keys if key in obj), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments, _, error = _decode_at(arguments, _skip_space(arguments, 0))
        if error is not None:
            return None, f"{name}: arguments string is not JSON: {error}"
    error = _arguments_problem(arguments)
    if error is not None:
        return None, f"{name}: {error}"
    call_id = obj.get("id")
    return ToolCall(name, arguments, call_id if isinstance(call_id, str) else None), None


def _arguments_problem(arguments: Any) -> str | None:
    if isinstance(arguments, dict):
        return None
    return f"arguments must be a JSON object, got {type(arguments).__name__}"


def _decode_at(text: str, position: int) -> tuple[Any, int, str | None]:
    """(value, end, None) for the JSON value at ``position``, or (None, position, why not)."""
    try:
        value, end = _DECODER.raw_decode(text, position)
    except json.JSONDecodeError as exc:
        return None, position, f"invalid JSON ({exc.msg}): {_excerpt(text[position:])}"
    except RecursionError:  # nesting deeper than the interpreter's stack
        return None, position, f"JSON nested too deeply: {_excerpt(text[position:])}"
    return value, end, None


def _starts_call(text: str, position: int) -> bool:
    """Whether a JSON object with a "name" starts at ``position`` (Llama's untagged form)."""
    if not text.startswith("{", position):
        return False
    obj, _, error = _decode_at(text, position)
    return (
        error is None
        and isinstance(obj, dict)
        and "name" in obj
        and ("parameters" in obj or "arguments" in obj)
    )


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _excerpt(text: str, limit: int = 120) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")
