"""Tools a policy may call: what a tool is, the built-in ones, and the runner that calls them.

A ``Tool`` is a plain Python function plus the JSON schema the chat template shows the model
(``apply_chat_template(tools=[tool.schema for tool in tools])``). ``as_tool`` builds one from a
typed function with a Google-style docstring, a built-in name (``"calculator"``, ``"python"``)
or an import path (``"pkg.mod:fn"``).

``ToolRunner.run`` executes the calls of one assistant turn and never raises on anything the
policy wrote: an unknown tool, arguments that do not fit, a tool that raises, hangs, or returns
something odd all become a ``ToolResult`` whose ``error`` names the kind of failure
(``ERROR_KINDS``) and whose ``content`` tells the policy what went wrong.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import operator
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from jaxpt.envs.base import ToolCall
from jaxpt.envs.imports import import_object
from jaxpt.rewards.sandbox import run_untrusted

# What ToolResult.error may hold. A cut output is not an error (see ToolResult.truncated).
ERROR_KINDS = (
    "unknown_tool",  # no tool of that name
    "bad_arguments",  # arguments missing, unexpected or of the wrong JSON type
    "raised",  # the tool raised (or, for python, the program failed)
    "timeout",  # past its wall-time limit; the call's thread is abandoned
    "too_many_calls",  # past max_calls_per_turn: not run
    "malformed_call",  # the parser could not read the call (AssistantTurn.parse_errors)
)


class ToolError(Exception):
    """Raised by a tool to fail with a message meant for the policy, shown as is.

    ``kind`` is the ``ToolResult.error`` the runner reports ("raised" or "timeout").
    """

    def __init__(self, message: str, kind: str = "raised"):
        super().__init__(message)
        self.kind = kind if kind in ERROR_KINDS else "raised"


@dataclasses.dataclass(frozen=True)
class Tool:
    """A callable tool: ``fn(**arguments)`` and its OpenAI-style schema
    (``{"type": "function", "function": {"name", "description", "parameters"}}``).
    ``timeout_s`` overrides the runner's wall-time limit for this tool."""

    name: str
    fn: Callable[..., Any]
    schema: dict
    timeout_s: float | None = None


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """The outcome of one call: ``content`` is what the policy reads; ``error`` is None on
    success, else one of ``ERROR_KINDS``; ``truncated`` when the output was cut."""

    name: str
    content: str
    error: str | None = None
    truncated: bool = False


# --- building tools -------------------------------------------------------------------------


def as_tool(spec: Tool | Callable[..., Any] | str, *, timeout_s: float | None = None) -> Tool:
    """A ``Tool`` from a ``Tool``, a typed function with a Google-style docstring (its schema
    comes from ``transformers.utils.get_json_schema``), a built-in name (``BUILTIN_TOOLS``) or
    an import path ``"pkg.mod:fn"`` (a function, or a ``Tool``). ValueError names the spec
    when none can be built."""
    if isinstance(spec, Tool):
        return dataclasses.replace(spec, timeout_s=timeout_s) if timeout_s else spec
    if isinstance(spec, str):
        if spec in BUILTIN_TOOLS:
            tool = BUILTIN_TOOLS[spec]()
        elif ":" in spec:
            tool = as_tool(import_object(spec, "tool"))
        else:
            raise ValueError(
                f"unknown tool {spec!r}: use one of {sorted(BUILTIN_TOOLS)}, an import path "
                "'package.module:function' or a function"
            )
        return as_tool(tool, timeout_s=timeout_s)
    if not callable(spec):
        raise TypeError(f"cannot make a tool of {spec!r}: expected a function, a name or a Tool")
    from transformers.utils import get_json_schema  # heavy import, only when building

    try:
        schema = get_json_schema(spec)
    except Exception as exc:  # TypeHintParsingException, DocstringParsingException, ...
        name = getattr(spec, "__name__", repr(spec))
        raise ValueError(
            f"cannot make a tool of {name!r}: it needs type hints on every argument and a "
            f"Google-style docstring describing each ({exc})"
        ) from exc
    return Tool(name=schema["function"]["name"], fn=spec, schema=schema, timeout_s=timeout_s)


def resolve_tools(specs: Iterable[Tool | Callable[..., Any] | str]) -> list[Tool]:
    """``as_tool`` for each spec; two tools may not share a name."""
    tools = [as_tool(spec) for spec in specs]
    names = [tool.name for tool in tools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"several tools are named {duplicates}: tool names must be unique")
    return tools


# --- running calls --------------------------------------------------------------------------


class ToolRunner:
    """Runs the tool calls of a turn, in parallel, each bounded in time and output.

    Each call runs in its own daemon thread; at most ``max_workers`` run at once (a call waits
    for a slot within its own time limit). A call still running at its limit is abandoned: its
    thread keeps its slot until it ends (``abandoned`` counts such calls), and being a daemon,
    never keeps the process from exiting. Only ``max_calls_per_turn`` calls of a turn run.
    """

    def __init__(
        self,
        tools: Iterable[Tool | Callable[..., Any] | str],
        *,
        timeout_s: float = 10.0,
        max_output_chars: int = 2000,
        max_calls_per_turn: int = 8,
        max_workers: int = 8,
    ):
        self.tools = {tool.name: tool for tool in resolve_tools(tools)}
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self.max_calls_per_turn = max_calls_per_turn
        self._slots = threading.BoundedSemaphore(max_workers)
        self.abandoned = 0

    @property
    def schemas(self) -> list[dict]:
        """The tools' schemas, for ``apply_chat_template(tools=...)``."""
        return [tool.schema for tool in self.tools.values()]

    def run(self, calls: Sequence[ToolCall], parse_errors: Sequence[str] = ()) -> list[ToolResult]:
        """One result per call, in call order, then one "malformed_call" result per parse
        error (an ``AssistantTurn``'s ``parse_errors``)."""
        results: list[ToolResult | None] = [None] * len(calls)
        pending = []  # (index, tool, finished event, outcome, deadline)
        for index, call in enumerate(calls):
            if index >= self.max_calls_per_turn:
                results[index] = ToolResult(
                    _safe_name(call),
                    f"error: not run: at most {self.max_calls_per_turn} tool calls per turn",
                    "too_many_calls",
                )
                continue
            tool, arguments, failure = self._check(call)
            if failure is not None:
                results[index] = failure
                continue
            timeout_s = tool.timeout_s or self.timeout_s
            deadline = time.monotonic() + timeout_s
            if not self._slots.acquire(timeout=timeout_s):
                results[index] = ToolResult(
                    tool.name,
                    f"error: no worker free within {timeout_s:g} s (earlier calls still running)",
                    "timeout",
                )
                continue
            try:
                pending.append((index, tool, *self._start(tool, arguments), deadline))
            except RuntimeError as exc:  # no thread could be started
                self._slots.release()
                results[index] = ToolResult(tool.name, f"error: not run: {exc}", "raised")
        for index, tool, finished, outcome, deadline in pending:
            if finished.wait(max(0.0, deadline - time.monotonic())):
                results[index] = self._finish(tool, outcome)
            else:
                self.abandoned += 1
                limit = tool.timeout_s or self.timeout_s
                results[index] = ToolResult(
                    tool.name, f"error: {tool.name} took longer than {limit:g} s", "timeout"
                )
        results.extend(
            ToolResult("", self._cap(f"error: could not read this tool call: {error}")[0],
                       "malformed_call")
            for error in parse_errors
        )  # fmt: skip
        return results

    def _check(self, call: ToolCall) -> tuple[Tool | None, dict, ToolResult | None]:
        """(tool, arguments, None), or (None, {}, an error result) when the call cannot run."""
        name = _safe_name(call)
        tool = self.tools.get(name)
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "none"
            message = f"error: unknown tool {name!r}; the tools are: {known}"
            return None, {}, ToolResult(name, message, "unknown_tool")
        problem = _argument_problem(tool, call.arguments)
        if problem is not None:
            return None, {}, ToolResult(name, self._cap(f"error: {problem}")[0], "bad_arguments")
        return tool, dict(call.arguments), None

    def _start(self, tool: Tool, arguments: dict) -> tuple[threading.Event, dict]:
        finished, outcome = threading.Event(), {}

        def call():
            # Everything the tool's code decides (its return value's __str__, its exception's
            # message) is turned into text here, under the call's time limit.
            try:
                outcome["text"], outcome["error"] = _as_text(tool.fn(**arguments)), None
            except ToolError as exc:
                outcome["text"], outcome["error"] = _safe_str(exc), exc.kind
            except BaseException as exc:  # noqa: BLE001 - SystemExit too: always report back
                outcome["text"] = f"error: {type(exc).__name__}: {_safe_str(exc)}"
                outcome["error"] = "raised"
            finally:
                self._slots.release()
                finished.set()

        threading.Thread(target=call, name=f"tool-{tool.name}", daemon=True).start()
        return finished, outcome

    def _finish(self, tool: Tool, outcome: dict) -> ToolResult:
        content, truncated = self._cap(outcome["text"])
        return ToolResult(tool.name, content, outcome["error"], truncated)

    def _cap(self, text: str) -> tuple[str, bool]:
        """The text, or its head and tail around a note when longer than max_output_chars."""
        limit = self.max_output_chars
        if len(text) <= limit:
            return text, False
        head, tail = text[: limit // 2], text[len(text) - (limit - limit // 2) :]
        return f"{head}\n[... {len(text) - limit} characters cut ...]\n{tail}", True


def tool_messages(calls: Sequence[ToolCall], results: Sequence[ToolResult]) -> list[dict]:
    """``{"role": "tool", "name", "content"}`` messages for the results (``tool_call_id`` where
    the call has an id); results past the calls (malformed calls) have no call to answer."""
    messages = []
    for index, result in enumerate(results):
        message = {"role": "tool", "name": result.name, "content": result.content}
        if index < len(calls) and calls[index].id is not None:
            message["tool_call_id"] = calls[index].id
        messages.append(message)
    return messages


_JSON_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def _argument_problem(tool: Tool, arguments: Any) -> str | None:
    """Why ``arguments`` cannot be passed to the tool, or None. The schema decides which names
    exist (so keyword-only knobs of ``fn`` stay out of the policy's reach) and their JSON
    types; the signature decides what is required."""
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__}"
    parameters = tool.schema.get("function", {}).get("parameters", {})
    properties = parameters.get("properties", {})
    unexpected = [str(key)[:50] for key in arguments if key not in properties]
    if unexpected:
        return f"{tool.name} takes no argument {unexpected}; its arguments are {list(properties)}"
    missing = [key for key in parameters.get("required", []) if key not in arguments]
    if missing:
        return f"{tool.name} is missing required arguments {missing}"
    for key, value in arguments.items():
        declared = properties[key].get("type")
        if declared is None:
            continue
        allowed = [declared] if isinstance(declared, str) else list(declared)
        if properties[key].get("nullable"):
            allowed.append("null")
        if not any(_is_json_type(value, kind) for kind in allowed):
            expected = " or ".join(allowed)
            return f"argument {key!r} of {tool.name} must be {expected}, got {_json_type(value)}"
    try:
        inspect.signature(tool.fn).bind(**arguments)
    except TypeError as exc:
        return f"{tool.name}: {exc}"
    except ValueError:  # no signature to inspect (some builtins): let the call decide
        pass
    return None


def _is_json_type(value: Any, kind: str) -> bool:
    if kind not in _JSON_TYPES:
        return True  # a type we do not check
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False
    return isinstance(value, _JSON_TYPES[kind])


def _json_type(value: Any) -> str:
    for kind in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _is_json_type(value, kind):
            return kind
    return type(value).__name__


def _safe_name(call: ToolCall) -> str:
    name = call.name if isinstance(call.name, str) else _safe_str(call.name, repr)
    return name[:200]  # the policy wrote it: it goes back into the conversation


def _as_text(value: Any) -> str:
    """What the policy reads of a return value: text as is, bytes decoded, the rest as JSON."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", errors="replace")
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except Exception:  # noqa: BLE001 - a list that contains itself, a hostile __str__
            text = _safe_str(value, repr)
    # Lone surrogates (from surrogateescape decoding) cannot be encoded by any tokenizer.
    return text.encode("utf-8", errors="replace").decode("utf-8")


def _safe_str(value: Any, convert: Callable[[Any], str] = str) -> str:
    try:
        return convert(value)
    except Exception:  # noqa: BLE001 - a hostile __str__ / __repr__
        return f"<unprintable {type(value).__name__}>"


# --- built-in tools -------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 200
MAX_INTEGER_BITS = 4096  # about 1,233 decimal digits: fast to compute and to print

_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly: + - * / // % ** and parentheses on integers
    and decimals, e.g. "(17 + 3) * 1474.75".

    Args:
        expression: The arithmetic expression to evaluate.
    """
    if not isinstance(expression, str):
        raise ToolError("error: the expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"error: expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        value = _evaluate(tree.body)
    except ToolError:
        raise
    except ZeroDivisionError:
        raise ToolError("error: division by zero") from None
    except OverflowError:
        raise ToolError("error: the result is too large") from None
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError(f"error: not an arithmetic expression: {expression[:80]!r}") from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("error: the result is not a finite number")
        return format(value, ".15g")  # no binary noise: 0.1 + 0.2 -> "0.3"
    return str(value)


def _evaluate(node: ast.AST) -> float:
    """Numbers and the arithmetic operators only; every other node is refused."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        _check_cost(type(node.op), left, right)
        return _checked(_BINARY_OPS[type(node.op)](left, right))
    what = type(node).__name__
    if isinstance(node, ast.Constant):
        what = type(node.value).__name__
    raise ToolError(f"error: only numbers and + - * / // % ** are allowed, not {what}")


def _check_cost(op: type, left: float, right: float) -> None:
    """Refuse, before computing, integer results too large to compute quickly."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return  # float arithmetic is bounded: it overflows instead
    if op is ast.Mult and left.bit_length() + right.bit_length() > MAX_INTEGER_BITS + 1:
        raise ToolError("error: the result is too large")
    lower_bound_bits = (abs(left).bit_length() - 1) * right  # of left ** right
    if op is ast.Pow and right > 0 and lower_bound_bits > MAX_INTEGER_BITS:
        raise ToolError("error: the result is too large")


def _checked(value: Any) -> float:
    if isinstance(value, complex):  # (-8) ** 0.5
        raise ToolError("error: the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
        raise ToolError("error: the result is too large")
    return value


def calculator_tool() -> Tool:
    return as_tool(calculator, timeout_s=2.0)


def python_tool(
    *, timeout_s: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 16 * 1024
) -> Tool:
    """The ``python`` tool: runs the policy's program in jaxpt's sandbox
    (``jaxpt.rewards.sandbox.run_untrusted``: a separate process with limits and no network)
    and returns what it prints; a failing program is a ``ToolError`` with its output and why."""

    def python(code: str) -> str:
        """Run a Python program and return what it prints. Nothing persists between calls.

        Args:
            code: The Python program; print the values you want to see.
        """
        result = run_untrusted(
            code, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes
        )
        if result.ok:
            return result.stdout
        if result.timed_out:
            reason, kind = f"the program ran past {timeout_s:g} s and was stopped", "timeout"
        elif result.killed_reason is not None:
            reason, kind = f"the program was killed ({result.killed_reason})", "raised"
        else:
            reason, kind = f"the program exited with status {result.returncode}", "raised"
        parts = [result.stdout.rstrip(), result.stderr.rstrip(), f"[{reason}]"]
        raise ToolError("\n".join(part for part in parts if part), kind)

    # The sandbox enforces the limit; the runner's is only a backstop past it.
    return as_tool(python, timeout_s=timeout_s + 10.0)


BUILTIN_TOOLS: dict[str, Callable[[], Tool]] = {
    "calculator": calculator_tool,
    "python": python_tool,
}
