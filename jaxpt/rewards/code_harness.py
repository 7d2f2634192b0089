"""Calls between a sandboxed program and the trusted tests that judge it.

Standard library only, and no jaxpt imports: `sandbox_launcher` loads this file by path under
whichever interpreter the sandbox was given.

Two processes talk over two pipes:
  program  runs the untrusted code as `__main__`, then `serve`s: it announces its global names,
           and for each call it receives (name, args, kwargs), calls its global of that name and
           replies with the result;
  runner   runs only the trusted tests (`run_tests`), in a namespace where each callable the
           program defines is a stub that makes such a call. The runner alone decides whether a
           test passed, and reports on a pipe that the program never holds.
Only plain data crosses, in both directions: None, bool, int, float, complex, str, bytes, list,
tuple, dict, set and frozenset, checked by exact type (no subclasses; OrderedDict, defaultdict and
Counter go as the dicts they compare equal to), with caps on nesting, size and message length. The
runner compares values it decoded itself, so an object whose `__eq__` always answers True, a
subclass that lies, or a patched serializer on the program's side cannot reach the comparison.
Consequences for honest programs: arguments are passed by value (a function
that mutates its argument in place is not observed by the tests), and results that are not plain
data (generators, instances of the program's classes, numpy values) fail the test that asked.
An exception raised in the program comes back as the builtin exception of the same name (a plain
`ProgramError` otherwise), so tests that expect e.g. a ValueError still work.
"""

import builtins
import collections
import contextlib
import importlib
import json
import os
import types

MAX_MESSAGE_BYTES = 8 * 2**20
MAX_NODES = 1_000_000
MAX_DEPTH = 100
# Data globals (`N = 10`) are offered to the tests up to these sizes, each and in all.
_MAX_GLOBAL_NODES, _MAX_GLOBAL_CHARS = 10_000, 64 * 1024
_MAX_GLOBALS_NODES, _MAX_GLOBALS_CHARS = 100_000, 2**20
_MAX_ERROR_CHARS = 2000
_HEADER_BYTES = 4
_JSON_SMALL_INT = 2**63  # larger ints travel as hex: no decimal conversion limit, exact

# Tags of the wire format: plain JSON carries None, bool, int, float and str; everything else is
# a JSON array whose first item names the type.
_SEQUENCE_TAGS = {list: "l", tuple: "t", set: "S", frozenset: "F"}
_SEQUENCE_TYPES = {"l": list, "t": tuple, "S": set, "F": frozenset}
# Exactly these dict subclasses compare like their dict: sent as plain dicts.
_DICT_TYPES = (dict, collections.OrderedDict, collections.defaultdict, collections.Counter)

# Modules the tests may use under a name the program bound them to (`import math`); the runner
# imports its own copy. Anything else the program imported stays unbound for the tests.
ALLOWED_MODULES = frozenset({
    "bisect", "cmath", "collections", "copy", "datetime", "decimal", "fractions", "functools",
    "heapq", "itertools", "json", "math", "operator", "random", "re", "statistics", "string",
    "sys", "typing",
})  # fmt: skip

# Program exceptions re-raised as builtins by name. Not StopIteration: raised from a call inside
# map() or filter() it would end the iteration silently instead of failing the test.
_EXCEPTIONS = {
    name: value
    for name, value in vars(builtins).items()
    if isinstance(value, type)
    and issubclass(value, Exception)
    and value not in (StopIteration, StopAsyncIteration)
}


class ProtocolError(Exception):
    """The other side sent something that is not a valid message."""


class ProgramError(Exception):
    """The program raised an exception that has no builtin counterpart."""


class ProgramGone(BaseException):
    """The program died, timed out or broke the protocol; no later call can succeed.

    A BaseException, so that a test's `except Exception` does not mistake it for the program's
    answer; the runner fails the test either way.
    """


# --- plain data <-> JSON trees ---------------------------------------------------------------


class _Budget:
    def __init__(self, nodes: int = MAX_NODES, chars: int = MAX_MESSAGE_BYTES):
        self.nodes = nodes
        self.chars = chars

    def take(self, nodes: int = 1, chars: int = 0) -> None:
        self.nodes -= nodes
        self.chars -= chars
        if self.nodes < 0 or self.chars < 0:
            raise ValueError("value too large to pass between the program and its tests")


def encode(value, budget: _Budget | None = None):
    """`value` as a JSON-ready tree; TypeError for anything but plain data, ValueError if large."""
    return _encode(value, 0, budget or _Budget())


def _encode(value, depth: int, budget: _Budget):
    budget.take()
    kind = type(value)
    if value is None or kind is bool or kind is float:
        return value
    if kind is int:
        return value if -_JSON_SMALL_INT < value < _JSON_SMALL_INT else ["i", hex(value)]
    if kind is str:
        budget.take(chars=len(value))
        return value
    if kind is bytes:
        budget.take(chars=2 * len(value))
        return ["y", value.hex()]
    if kind is complex:
        return ["c", value.real, value.imag]
    if depth >= MAX_DEPTH:
        raise ValueError("value nested too deeply to pass between the program and its tests")
    tag = _SEQUENCE_TAGS.get(kind)
    if tag is not None:
        return [tag, *(_encode(item, depth + 1, budget) for item in value)]
    if kind in _DICT_TYPES:
        tree = ["d"]
        for key, item in dict.items(value):
            tree.append(_encode(key, depth + 1, budget))
            tree.append(_encode(item, depth + 1, budget))
        return tree
    raise TypeError(f"a {kind.__name__} cannot pass between the program and its tests")


def decode(tree):
    """The plain value a tree stands for; ProtocolError for anything malformed or too large."""
    try:
        return _decode(tree, 0, _Budget())
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 -- e.g. an unhashable set member, a bad hex digit
        raise ProtocolError(f"malformed value: {exc!r}") from None


def _decode(tree, depth: int, budget: _Budget):
    budget.take()
    kind = type(tree)
    if tree is None or kind is bool or kind is int or kind is float or kind is str:
        return tree
    if kind is not list or not tree or type(tree[0]) is not str or depth >= MAX_DEPTH:
        raise ProtocolError("malformed value")
    tag, items = tree[0], tree[1:]
    sequence = _SEQUENCE_TYPES.get(tag)
    if sequence is not None:
        return sequence(_decode(item, depth + 1, budget) for item in items)
    if tag == "d" and len(items) % 2 == 0:
        values = [_decode(item, depth + 1, budget) for item in items]
        return dict(zip(values[0::2], values[1::2], strict=True))
    if tag == "i" and len(items) == 1 and type(items[0]) is str:
        return int(items[0], 16)
    if tag == "y" and len(items) == 1 and type(items[0]) is str:
        return bytes.fromhex(items[0])
    if tag == "c" and len(items) == 2 and all(type(part) is float for part in items):
        return complex(*items)
    raise ProtocolError(f"malformed value with tag {tag[:20]!r}")


# --- framing: a 4-byte length, then that many bytes of JSON --------------------------------------


def dumps(message: list) -> bytes:
    """A frame for `message`; ValueError when it would exceed MAX_MESSAGE_BYTES."""
    payload = json.dumps(message, separators=(",", ":")).encode()
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ValueError("message too large to pass between the program and its tests")
    return len(payload).to_bytes(_HEADER_BYTES, "big") + payload


def send(fd: int, frame: bytes) -> None:
    view = memoryview(frame)
    while view:
        view = view[os.write(fd, view) :]


def receive(fd: int) -> list:
    """The next message: a non-empty list starting with a str. EOFError at a clean end."""
    header = _read_exact(fd, _HEADER_BYTES, eof_ok=True)
    size = int.from_bytes(header, "big")
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {size} bytes is over the limit")
    try:
        message = json.loads(_read_exact(fd, size, eof_ok=False))
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 -- invalid UTF-8 or JSON, nesting too deep
        raise ProtocolError(f"malformed message: {exc!r}") from None
    if type(message) is not list or not message or type(message[0]) is not str:
        raise ProtocolError("malformed message")
    return message


def _read_exact(fd: int, size: int, *, eof_ok: bool) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(remaining, 2**20))
        if not chunk:
            if eof_ok and remaining == size:
                raise EOFError
            raise ProtocolError("connection closed in the middle of a message")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# --- the program's side ----------------------------------------------------------------------------


def serve(namespace: dict, calls_in: int, replies_out: int) -> None:
    """Announce the program's globals, then answer calls until the runner hangs up."""
    send(replies_out, dumps(["ready", describe(namespace)]))
    while True:
        try:
            message = receive(calls_in)
        except EOFError:
            return
        try:
            _, name, args, kwargs = message
            result = namespace[name](*decode(args), **decode(kwargs))
            frame = dumps(["ok", encode(result)])
        except BaseException as exc:  # noqa: BLE001 -- this call fails; the program serves on
            frame = dumps(["error", type(exc).__name__, _error_text(exc)])
        send(replies_out, frame)


def describe(namespace: dict) -> list:
    """[name, "call"] | [name, "module", module name] | [name, "value", tree] per global."""
    entries, room = [], _Budget(_MAX_GLOBALS_NODES, _MAX_GLOBALS_CHARS)
    for name, value in list(namespace.items()):
        if type(name) is not str or (name.startswith("__") and name.endswith("__")):
            continue
        if type(value) is types.ModuleType:
            if type(value.__name__) is str:
                entries.append([name, "module", value.__name__])
        elif callable(value):
            entries.append([name, "call"])
        else:
            budget = _Budget(_MAX_GLOBAL_NODES, _MAX_GLOBAL_CHARS)
            try:
                tree = encode(value, budget)
                room.take(_MAX_GLOBAL_NODES - budget.nodes, _MAX_GLOBAL_CHARS - budget.chars)
            except (TypeError, ValueError, RecursionError):
                continue  # not plain data, or too big: the tests cannot use it
            entries.append([name, "value", tree])
    return entries


def _error_text(exc: BaseException) -> str:
    try:
        return str(exc)[:_MAX_ERROR_CHARS]
    except Exception:  # noqa: BLE001 -- a broken __str__ still fails only this call
        return ""


# --- the runner's side -------------------------------------------------------------------------


class _Program:
    """The runner's handle on the program process; every failure of the channel is final."""

    def __init__(self, calls_out: int, replies_in: int):
        self.calls_out = calls_out
        self.replies_in = replies_in
        self.dead = False

    def namespace(self) -> dict:
        """The tests' globals: builtins, and a stub per callable the program defines."""
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        try:
            message = receive(self.replies_in)
            if message[0] != "ready" or len(message) != 2 or type(message[1]) is not list:
                raise ProtocolError("expected the program's globals")
            for entry in message[1]:
                self._bind(namespace, entry)
        except Exception:  # noqa: BLE001 -- program died before serving, or sent garbage
            self.dead = True
        return namespace

    def _bind(self, namespace: dict, entry) -> None:
        if type(entry) is not list or len(entry) < 2 or type(entry[0]) is not str:
            raise ProtocolError("malformed global")
        name, kind = entry[0], entry[1]
        if not name.isidentifier():
            raise ProtocolError("malformed global name")
        if name in vars(builtins) or (name.startswith("__") and name.endswith("__")):
            return  # `abs`, `len`, `isinstance`...: the tests keep the real ones
        if kind == "call" and len(entry) == 2:
            namespace[name] = self._stub(name)
        elif kind == "module" and len(entry) == 3 and type(entry[2]) is str:
            if entry[2] in ALLOWED_MODULES:
                namespace[name] = importlib.import_module(entry[2])
        elif kind == "value" and len(entry) == 3:
            namespace[name] = decode(entry[2])
        else:
            raise ProtocolError("malformed global")

    def _stub(self, name: str):
        def call(*args, **kwargs):
            return self.call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call

    def call(self, name: str, args: tuple, kwargs: dict):
        if self.dead:
            raise ProgramGone("the program is no longer answering")
        # Arguments that are not plain data fail this call only: nothing was sent.
        frame = dumps(["call", name, encode(args), encode(kwargs)])
        try:
            send(self.calls_out, frame)
            reply = receive(self.replies_in)
            if reply[0] == "ok" and len(reply) == 2:
                return decode(reply[1])
            if reply[0] != "error" or len(reply) != 3 or not all(type(x) is str for x in reply[1:]):
                raise ProtocolError("malformed reply")
        except Exception:  # noqa: BLE001 -- EOF, broken pipe, garbage: the program is done
            self.dead = True
            raise ProgramGone("the program stopped answering") from None
        raise _program_exception(reply[1], reply[2])


def _program_exception(type_name: str, text: str) -> Exception:
    exception_type = _EXCEPTIONS.get(type_name)
    if exception_type is not None:
        with contextlib.suppress(Exception):  # e.g. UnicodeDecodeError wants five arguments
            return exception_type(text)
    return ProgramError(f"{type_name}: {text}")


def run_tests(statements, calls_out: int, replies_in: int, verdicts_out: int) -> None:
    """Run `statements` [(is_test, source)] in order against the program.

    Writes one byte per test to `verdicts_out`, b"P" (passed) or b"F", in order; stops at a
    failed setup statement or once the program is gone (the tests not reported count as failed).
    A test passes when it raises nothing and the program was still answering when it ended.
    """
    program = _Program(calls_out, replies_in)
    namespace = program.namespace()
    for is_test, source in statements:
        if program.dead:
            return
        try:
            exec(compile(source, "<tests>", "exec"), namespace)  # noqa: S102 -- trusted tests
            ok = not program.dead
        except BaseException:  # noqa: BLE001 -- a failed assert, or anything else: failed
            ok = False
        if is_test:
            os.write(verdicts_out, b"P" if ok else b"F")
        elif not ok:
            return  # failed setup: the remaining tests count as failed
