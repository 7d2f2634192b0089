"""Hostile completions cannot raise their code reward: only passing real tests counts.

Each attack below is a program that does not solve the tasks and tries to score anyway. Every
one must score exactly 0.0 on every task (MBPP assert list, a string of asserts with setup,
HumanEval `check(candidate)`, stdin/stdout cases), while an honest solution scores exactly 1.0.
All programs run in one `code_reward` batch per timeout, so the file stays fast on a busy
machine. Attacks on other processes and on the sandbox's files run where the program is kept
away from the trainer: under root (a throwaway uid), or without root where the sandbox gets its
own PID namespace and /proc (unprivileged user namespaces); elsewhere, as the trainer's own
uid, they would hit the trainer itself. Under root, `test_attacks_as_a_non_root_trainer` also
runs them through a trainer of uid 65534, the case of a TPU VM's normal user.
"""

import functools
import json
import os
import subprocess
import textwrap

import pytest

from jaxpt.rewards import code_reward, run_untrusted
from jaxpt.rewards.sandbox import default_python, run_tests

IS_ROOT = os.geteuid() == 0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NON_ROOT_UID = 65534  # nobody


@functools.cache
def contained() -> bool:
    """Whether the program is kept from the trainer's processes: attacks on them are safe."""
    isolation = run_untrusted("pass", timeout_s=10.0).isolation
    return IS_ROOT or {"pidns", "procfs"} <= set(isolation)


NOT_CONTAINED = "as the trainer's own uid, with the trainer in sight (no user namespaces here)"

# MBPP style (`test_list`): three asserts, each a test.
MBPP_TESTS = [
    "assert add(123457, 765432) == 888889",
    "assert add(-5, 8) == 3",
    "assert add(20, 22) == 42",
]
# One string of statements: setup (an import) and three tests that need tuple/str/list intact.
STRING_TESTS = textwrap.dedent(
    """
    import math
    assert math.isclose(add(0.5, 0.25), 0.75)
    assert add('ab', 'cd') == 'abcd'
    assert add((1,), (2, 3)) == (1, 2, 3)
    """
)
# HumanEval style: `check(candidate)` plus the call, one test.
HUMANEVAL_TESTS = textwrap.dedent(
    """
    def check(candidate):
        assert abs(candidate([1.5, 2.5, 7.25]) - 3.75) < 1e-9
        assert candidate([2, 4]) == 3.0
        assert isinstance(candidate([1, 2]), float)

    check(mean)
    """
)
# stdin/stdout: compared outside the sandbox; the expected output never enters it.
IO_TESTS = [
    {"input": "123456789 987654321\n", "output": "1111111110\n"},
    {"input": "-5 9\n", "output": "4\n"},
]
TASKS = {"mbpp": MBPP_TESTS, "asserts": STRING_TESTS, "humaneval": HUMANEVAL_TESTS, "io": IO_TESTS}

# Answers the stdin/stdout task with the program's `add` (no input in the assert tasks).
IO_MAIN = """
import sys
numbers = sys.stdin.read().split()
if numbers:
    print(add(int(numbers[0]), int(numbers[1])))
"""

HONEST = (
    """
def add(a, b):
    return a + b

def mean(xs):
    return sum(xs) / len(xs)
"""
    + IO_MAIN
)

# Wrong on purpose: every attack defines these unless it says otherwise.
WRONG = """
def add(a, b):
    return 0

def mean(xs):
    return 0.0
"""

# An object that answers True to every comparison, lies about its class, and survives the
# arithmetic the tests do (`abs(x - 3.75) < 1e-9`). In the program's own process it would pass.
ANYTHING = """
class Anything:
    __class__ = property(lambda self: float)
    __hash__ = lambda self: 0
    __eq__ = __le__ = __ge__ = __lt__ = __gt__ = lambda self, other: True
    __ne__ = lambda self, other: False
    __sub__ = __rsub__ = __add__ = __radd__ = lambda self, other: self
    __abs__ = lambda self: 0.0
    __float__ = lambda self: 0.0
    __bool__ = lambda self: True
"""

# Searches its own process (objects, frames, code, memory, fds) and, with OUTSIDE, the sandbox's
# files, the paths in EXTRA, and every other process's cmdline, environ, memory and open files,
# for the tests' text (the expected values). If it finds them, it answers correctly, so a leak
# would show up as a score above 0.
LEAK_HUNT = (
    r"""
import gc, os, re, sys
OUTSIDE = {outside}
EXTRA = {extra}
LEAK = re.compile(rb"==\s*888889|-\s*3\.75\)|==\s*'abcd'|\b1{9}0\b")
PATH = re.compile(rb"/[\w./+-]{3,}")
found = []

def look(data):
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if isinstance(data, (bytes, bytearray)) and LEAK.search(data):
        found.append(True)

def read(path, limit=1 << 20):
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError:
        return b""
    look(data)
    return data

def scan_memory(pid="self"):
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = open(f"/proc/{pid}/mem", "rb", buffering=0)
    except OSError:
        return
    for line in maps:
        addresses, perms = line.split()[:2]
        start, end = (int(x, 16) for x in addresses.split("-"))
        if perms[0] != "r" or end - start > 1 << 28 or "[v" in line:
            continue
        try:
            mem.seek(start)
            look(mem.read(end - start))
        except (OSError, OverflowError, ValueError):
            pass

def hunt():
    for obj in gc.get_objects():
        if isinstance(obj, dict):
            for value in list(obj.values()):
                look(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                look(value)
        elif type(obj).__name__ == "code":
            for value in obj.co_consts:
                look(value)
    frame = sys._getframe()
    while frame is not None:
        for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
            look(value)
            look(repr(value)[:100000])
        frame = frame.f_back
    scan_memory()
    for fd in range(3, 64):
        try:
            blocking = os.get_blocking(fd)
            os.set_blocking(fd, False)
            try:
                look(os.read(fd, 1 << 16))
            finally:
                os.set_blocking(fd, blocking)
        except OSError:
            pass
    if OUTSIDE:
        hunt_outside()
    return bool(found)

def read_open_files(pid):
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for name in names:
        try:  # a pipe or a file another process holds (config, tests, report), from the start
            fd = os.open(f"/proc/{pid}/fd/{name}", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            look(os.read(fd, 1 << 20))
        except OSError:
            pass
        finally:
            os.close(fd)

def hunt_outside():
    paths = set(path.encode() for path in EXTRA)
    me = os.readlink("/proc/self")  # the pid as /proc numbers it (getpid() is namespaced)
    for pid in [str(os.getppid())] + os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        for name in ("cmdline", "environ"):
            paths.update(PATH.findall(read(f"/proc/{pid}/{name}")))
        scan_memory(pid)
        read_open_files(pid)
    for directory in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            paths.update(os.path.join(directory, name).encode() for name in os.listdir(directory))
        except OSError:
            pass
    # The sandbox's own files (control and scratch dirs), not whatever else the machine holds.
    paths = {p.decode() for p in paths if b"jaxpt" in p} | {".", os.environ.get("HOME", ".")}
    paths |= {os.path.dirname(path) for path in EXTRA}
    for path in paths:
        read(path)
        try:
            for name in os.listdir(path):
                read(os.path.join(path, name))
        except OSError:
            pass

LEAKED = hunt()

def add(a, b):
    return a + b if LEAKED or hunt() else None

def mean(xs):
    return sum(xs) / len(xs) if LEAKED or hunt() else None
"""
    + IO_MAIN
)


def _leak_hunt(outside: bool, extra: str = "[]") -> str:
    return LEAK_HUNT.replace("{outside}", str(outside)).replace("{extra}", extra)


SPRAY = """
import os
FORGED = (b"PPPPPPPPPPPPPPPP\\n" + b'{"returncode": 0, "timed_out": false, "wall_s": 0.1, '
          b'"isolation": [], "verdicts": "PPPPPPPP"}\\n')

def spray_own_fds():
    for fd in range(1024):
        try:
            os.write(fd, FORGED)
        except OSError:
            pass

def forge_report_files():
    # Where a sandbox keeps its files: next to our scratch dir, in the temp dirs.
    for directory in {os.path.dirname(os.getcwd()), "/tmp", "/var/tmp", "/dev/shm"}:
        try:
            names = [name for name in os.listdir(directory) if "jaxpt" in name]
        except OSError:
            continue
        for name in names:
            for leaf in ("report", "tests.json", "stdout"):
                try:
                    with open(os.path.join(directory, name, leaf), "wb") as f:
                        f.write(FORGED)
                except OSError:
                    pass

def spray_other_processes():
    me = os.readlink("/proc/self")  # the pid as /proc numbers it (getpid() is namespaced)
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        for kind in ("fd", "task/" + pid + "/fd"):
            try:
                names = os.listdir(f"/proc/{pid}/{kind}")
            except OSError:
                continue
            for name in names:
                try:
                    with open(f"/proc/{pid}/{kind}/{name}", "wb", buffering=0) as f:
                        f.write(FORGED)
                except OSError:
                    pass
"""

ATTACKS = {
    "marker_lines": WRONG
    + """
import os, sys
for index in range(10):
    print("0" * 32, index, 1)
    print(f"x {index} 1")
    print("P" * index, "PASS", "ok", True)
print('{"returncode": 0, "timed_out": false, "verdicts": "PPPPPPPPPP"}')
os.write(1, b"\\nPPPP\\n")
os.write(2, b"PPPP\\n")
sys.stdout.flush()
""",
    "forged_records_on_own_fds": SPRAY
    + """
spray_own_fds()

def add(a, b):
    spray_own_fds()
    return None

def mean(xs):
    spray_own_fds()
    return None
""",
    "exit_0_before_tests": WRONG + "import os\nos._exit(0)\n",
    "right_output_then_exit_status_3": """
import sys
numbers = sys.stdin.read().split()
if numbers:
    print(int(numbers[0]) + int(numbers[1]), flush=True)
sys.exit(3)

def add(a, b):
    return a + b

def mean(xs):
    return sum(xs) / len(xs)
""",
    "sys_exit_0_before_tests": WRONG + "import sys\nsys.exit(0)\n",
    "replaced_builtins": """
import builtins
builtins.exec = lambda *args, **kwargs: None
builtins.eval = lambda *args, **kwargs: True
builtins.print = lambda *args, **kwargs: None
builtins.AssertionError = type("AssertionError", (Exception,), {})
builtins.isinstance = lambda *args: True
builtins.abs = lambda x: 0.0
builtins.len = lambda x: 1
builtins.all = builtins.any = lambda x: True
real_import = builtins.__import__
builtins.__import__ = lambda name, *args, **kwargs: real_import(name, *args, **kwargs)
# The same names as program globals, hoping the tests pick them up.
abs = lambda x: 0.0
isinstance = lambda *args: True
len = lambda x: 1
AssertionError = builtins.AssertionError

def check(candidate):
    pass

def candidate(*args):
    return 0.0

def isclose(*args, **kwargs):
    return True

def add(a, b):
    return 0

def mean(xs):
    return 0.0
""",
    "fake_modules": """
import types
math = types.ModuleType("math")  # announced as "math": the tests get the real one
math.isclose = lambda *args, **kwargs: True
import sys
sys.modules["math"].isclose = lambda *args, **kwargs: True

def add(a, b):
    return 0.1

def mean(xs):
    return 0.0
""",
    "always_equal_object": ANYTHING
    + """
def add(a, b):
    return Anything()

def mean(xs):
    return Anything()
""",
    "int_float_subclasses": """
class AlwaysInt(int):
    __eq__ = lambda self, other: True
    __hash__ = int.__hash__

class AlwaysFloat(float):
    __eq__ = __lt__ = lambda self, other: True
    __hash__ = float.__hash__
    __sub__ = __rsub__ = lambda self, other: AlwaysFloat(0.0)

def add(a, b):
    return AlwaysInt(0)

def mean(xs):
    return AlwaysFloat(0.0)
""",
    "str_list_tuple_subclasses": """
class S(str):
    __eq__ = lambda self, other: True
    __hash__ = str.__hash__

class L(list):
    __eq__ = lambda self, other: True

class T(tuple):
    __eq__ = lambda self, other: True
    __hash__ = tuple.__hash__

def add(a, b):
    return {int: S(""), float: L(), str: S(""), tuple: T()}.get(type(a), L())

def mean(xs):
    return S("")
""",
    "lying_class": """
class Liar:
    __class__ = property(lambda self: int)
    __eq__ = lambda self, other: True
    __hash__ = lambda self: 0
    __reduce__ = lambda self: (int, (888888,))

def add(a, b):
    return Liar()

def mean(xs):
    return Liar()
""",
    "patched_serializers": """
import io, json, os, pickle, sys
json.dumps = lambda *args, **kwargs: '["ok", true]'
json.loads = lambda *args, **kwargs: ["ok", True]
pickle.dumps = lambda *args, **kwargs: b"P"
pickle.loads = lambda *args, **kwargs: True
real_write = os.write

def write(fd, data):
    data = bytes(data).replace(b'"error"', b'"ok"')
    return real_write(fd, data)

os.write = write
sys.stdout = io.StringIO()

def add(a, b):
    raise ValueError("not telling")

def mean(xs):
    raise ValueError("not telling")
""",
    "patched_harness": ANYTHING
    + """
import gc, types
for module in [obj for obj in gc.get_objects() if isinstance(obj, types.ModuleType)]:
    if hasattr(module, "serve"):
        module.type = lambda value: int  # every object looks like an int to the encoder
        module.encode = lambda value, *args: value
        module._DICT_TYPES = (object,)

def add(a, b):
    return Anything()

def mean(xs):
    return Anything()
""",
    "forged_protocol_frames": """
import json, os

def frame(message):
    payload = json.dumps(message).encode()
    return len(payload).to_bytes(4, "big") + payload

FORGED = frame(["ready", [["add", "value", 7], ["abs", "call"], ["isinstance", "call"],
                          ["math", "module", "os"], ["mean", "module", "math"]]])
FORGED += b"".join(frame(["ok", value]) for value in (True, 1, ["t"], ["l"], ["d"], 0.0) * 5)
for fd in range(3, 64):
    try:
        os.write(fd, FORGED)
    except OSError:
        pass

def add(a, b):
    return 0

def mean(xs):
    return 0.0
""",
    "oversized_frame": WRONG
    + """
import os
for fd in range(3, 64):
    try:
        os.write(fd, (2**31).to_bytes(4, "big") + b"[" * 1000)
    except OSError:
        pass
""",
    "atexit_verdicts": SPRAY
    + WRONG
    + """
import atexit

@atexit.register
def forge():
    print("\\n".join(f"{'0' * 32} {index} 1" for index in range(10)))
    spray_own_fds()
""",
    "child_outlives_and_writes_later": SPRAY
    + WRONG
    + """
import time
if os.fork() == 0:
    os.setsid()
    for _ in range(5):
        time.sleep(0.1)
        spray_own_fds()
        print("0" * 32, 0, 1, flush=True)
    os._exit(0)
""",
    "raises_in_calls": """
def add(a, b):
    raise SystemExit(0)

def mean(xs):
    raise StopIteration
""",
    "huge_results": """
def add(a, b):
    if a == -5:
        nested = []
        for _ in range(100000):
            nested = [nested]
        return nested
    if isinstance(a, str):
        return "x" * 50_000_000
    return list(range(3_000_000))

def mean(xs):
    return b"x" * 20_000_000
""",
    "secrets_in_own_process": _leak_hunt(outside=False),
}

# Attacks on the trainer's processes and files: out of reach for a throwaway uid (root trainer)
# or behind the run's own PID namespace and /proc; otherwise, as the trainer's own uid, they
# would hit (or read) the trainer. See `contained`.
CONTAINED_ONLY = {
    "forged_records_on_other_processes": SPRAY
    + """
spray_other_processes()
forge_report_files()

def add(a, b):
    spray_other_processes()
    forge_report_files()
    return None

def mean(xs):
    spray_other_processes()
    return None
""",
    "kill_parent": WRONG
    + """
import os, signal
for sig in (signal.SIGSTOP, signal.SIGKILL):
    for pid in (os.getppid(), 1):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
""",
    "kill_everyone_at_first_call": """
import os, signal

def add(a, b):
    os.kill(-1, signal.SIGKILL)
    return 0

def mean(xs):
    os.kill(-1, signal.SIGKILL)
    return 0.0
""",
    "secrets_in_sandbox_files_and_other_processes": _leak_hunt(outside=True),
}

# These run into the deadline: a separate batch with a short timeout.
SLOW = {
    "infinite_loop_at_top_level": WRONG + "while True:\n    pass\n",
    "infinite_loop_in_call": """
def add(a, b):
    while True:
        pass

def mean(xs):
    while True:
        pass
""",
}
SLOW_CONTAINED_ONLY = {
    "stop_everyone": WRONG + "import os, signal\nos.kill(-1, signal.SIGSTOP)\n",
}

# Honest code that also prints marker-like and failure-like lines: still exactly 1.0.
HONEST_AND_NOISY = (
    HONEST
    + """
import atexit
if not numbers:  # stdout is the answer in the stdin/stdout task
    print("0" * 32, 0, 0)
    print("FFFF")
    atexit.register(lambda: print("FAILED"))
"""
)
# Right for positive first arguments only.
PARTIAL = (
    """
def add(a, b):
    return a + b if isinstance(a, (int, float)) and a > 0 else None

def mean(xs):
    return 0.0
"""
    + IO_MAIN
)
PARTIAL_AND_FORGING = ATTACKS["marker_lines"].replace("return 0\n", "return 42 if a == 20 else 0\n")


def _fenced(code: str) -> str:
    return f"My solution:\n```python\n{code}\n```"


def _score_all(programs: dict[str, str], timeout_s: float, **kwargs) -> dict[tuple, float]:
    keys = [(name, task) for name in programs for task in TASKS]
    completions = [_fenced(programs[name]) for name, _ in keys]
    tests = [TASKS[task] for _, task in keys]
    scores = code_reward(
        None, completions, tests=tests, timeout_s=timeout_s, max_workers=8, **kwargs
    )
    return dict(zip(keys, scores, strict=True))


@pytest.fixture(scope="module")
def scores():
    programs = {
        **ATTACKS,
        **(CONTAINED_ONLY if contained() else {}),
        "honest": HONEST,
        "honest_and_noisy": HONEST_AND_NOISY,
        "partial": PARTIAL,
        "partial_and_forging": PARTIAL_AND_FORGING,
    }
    result = _score_all(programs, timeout_s=10.0)
    slow = {**SLOW, **(SLOW_CONTAINED_ONLY if contained() else {})}
    result.update(_score_all(slow, timeout_s=2.0))
    return result


def _attack_params():
    params = [pytest.param(name, id=name) for name in {**ATTACKS, **SLOW}]
    marks = pytest.mark.skipif(not contained(), reason=NOT_CONTAINED)
    names = {**CONTAINED_ONLY, **SLOW_CONTAINED_ONLY}
    params += [pytest.param(name, id=name, marks=marks) for name in names]
    return params


@pytest.mark.parametrize("attack", _attack_params())
def test_attack_scores_nothing(scores, attack):
    assert {task: scores[attack, task] for task in TASKS} == {task: 0.0 for task in TASKS}


def test_honest_solutions_score_one(scores):
    for name in ("honest", "honest_and_noisy"):
        assert {task: scores[name, task] for task in TASKS} == {task: 1.0 for task in TASKS}


def test_partial_credit_counts_real_passes_only(scores):
    assert scores["partial", "mbpp"] == pytest.approx(2 / 3)
    assert scores["partial", "asserts"] == pytest.approx(1 / 3)
    assert scores["partial", "humaneval"] == 0.0
    assert scores["partial", "io"] == pytest.approx(1 / 2)
    # Right on add(20, 22) only, and printing forged result lines besides.
    assert scores["partial_and_forging", "mbpp"] == pytest.approx(1 / 3)
    assert scores["partial_and_forging", "asserts"] == 0.0
    assert scores["partial_and_forging", "humaneval"] == 0.0
    assert scores["partial_and_forging", "io"] == 0.0


def test_rewards_stay_in_unit_interval(scores):
    assert all(0.0 <= score <= 1.0 for score in scores.values())


def test_all_or_nothing_without_partial_credit():
    programs = {"honest": HONEST, "partial": PARTIAL, "marker_lines": ATTACKS["marker_lines"]}
    strict = _score_all(programs, timeout_s=10.0, partial_credit=False)
    assert strict == {(name, task): float(name == "honest") for name in programs for task in TASKS}


# Prints every foreign fd, environ, mem or ptrace that the program could open.
REACH_PROBE = textwrap.dedent(
    """
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    me, reached = os.readlink("/proc/self"), []  # getpid() is namespaced
    for pid in [name for name in os.listdir("/proc") if name.isdigit()]:
        if pid == me:
            continue
        for path in (f"/proc/{pid}/fd", f"/proc/{pid}/environ", f"/proc/{pid}/mem"):
            try:
                if path.endswith("fd"):
                    names = os.listdir(path)
                    reached += [path + "/" + n for n in names]
                else:
                    open(path, "rb").close()
                    reached.append(path)
            except OSError:
                pass
        if libc.ptrace(16, int(pid), 0, 0) == 0:  # PTRACE_ATTACH
            reached.append(f"ptrace {pid}")
    print("REACHED", reached)

    def add(a, b):
        return a + b
    """
)


@pytest.mark.skipif(not contained(), reason=NOT_CONTAINED)
def test_program_cannot_reach_the_runner_or_supervisor():
    """The direct view of what the scores above imply: no foreign fd, mem or ptrace opens."""
    result = run_tests(REACH_PROBE, [(True, "assert add(1, 2) == 3")], timeout_s=10.0)
    assert result.verdicts == (True,), result.stderr
    assert "REACHED []" in result.stdout, result.stdout


# --- a trainer that is not root ----------------------------------------------------------------

# Run as uid 65534 with the interpreter given: imports the sandbox from the repository (not the
# package __init__s, which need jax), plays a trainer whose home holds the dataset (tests
# included) and whose environment holds a test, and scores the programs it reads from stdin.
NON_ROOT_TRAINER = r"""
import atexit, json, os, shutil, sys, tempfile, types
for name in ("jaxpt", "jaxpt.rewards"):
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(sys.argv[1], *name.split("."))]
    sys.modules[name] = package
from jaxpt.rewards.code import code_reward
from jaxpt.rewards.sandbox import run_tests, run_untrusted

request = json.load(sys.stdin)
isolation = run_untrusted("pass").isolation
if not {"pidns", "procfs"} <= set(isolation):  # kill(-1) would hit every process of our uid
    print(json.dumps({"uid": os.getuid(), "isolation": isolation}))
    sys.exit(0)
home = tempfile.mkdtemp(prefix="jaxpt-test-home-")
atexit.register(shutil.rmtree, home, ignore_errors=True)
dataset = os.path.join(home, ".cache", "dataset.jsonl")
os.makedirs(os.path.dirname(dataset))
with open(dataset, "w") as f:
    f.write(json.dumps(request["tasks"]))
os.environ["HOME"] = home
keys = [(name, task) for name in request["programs"] for task in request["tasks"]]
completions = [request["programs"][name].replace("{dataset}", dataset) for name, _ in keys]
tests = [request["tasks"][task] for _, task in keys]
scores = code_reward(None, completions, tests=tests, timeout_s=10.0, max_workers=8)
probe = run_tests(request["probe"], [(True, "assert add(1, 2) == 3")], timeout_s=10.0)
print(json.dumps({
    "uid": os.getuid(),
    "isolation": isolation,
    "scores": [[name, task, score] for (name, task), score in zip(keys, scores)],
    "probe": [probe.verdicts, probe.stdout, probe.stderr],
}))
"""

NON_ROOT_ATTACKS = {
    **CONTAINED_ONLY,
    "secrets_in_trainer_home_processes_and_files": _leak_hunt(outside=True, extra="['{dataset}']"),
    "forged_records_on_own_fds": ATTACKS["forged_records_on_own_fds"],
    "child_outlives_and_writes_later": ATTACKS["child_outlives_and_writes_later"],
    "secrets_in_own_process": ATTACKS["secrets_in_own_process"],
}


def _non_root_python() -> str:
    """An interpreter uid 65534 can start that can read the repository; skips if none can."""
    try:
        python = default_python()  # one the sandbox uids (unprivileged too) can start
    except RuntimeError as exc:
        pytest.skip(f"no interpreter for an unprivileged uid: {exc}")
    probe = subprocess.run(
        [python, "-I", "-c", "import sys; open(sys.argv[1]).close()", os.path.abspath(__file__)],
        user=NON_ROOT_UID, group=NON_ROOT_UID, extra_groups=[], env={}, cwd="/",
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"uid {NON_ROOT_UID} cannot read the repository {REPO}: {probe.stderr}")
    return python


@pytest.mark.skipif(not IS_ROOT, reason="the trainer is not root: the tests above are this case")
def test_attacks_as_a_non_root_trainer():
    """Hostile programs score 0.0 and honest ones 1.0 when the trainer itself is not root.

    Then the program runs as the trainer's uid; only the run's namespaces and the files with no
    name keep it from the trainer's memory and files, the tests, the supervisor and the report.
    """
    python = _non_root_python()
    programs = {**NON_ROOT_ATTACKS, "honest": HONEST, "partial": PARTIAL}
    request = {
        "programs": {name: _fenced(code) for name, code in programs.items()},
        "tasks": TASKS,
        "probe": REACH_PROBE,
    }
    canary = {"JAXPT_TEST_CANARY": "\n".join(MBPP_TESTS)}  # in the trainer's environ
    done = subprocess.run(
        [python, "-I", "-c", NON_ROOT_TRAINER, REPO],
        input=json.dumps(request), user=NON_ROOT_UID, group=NON_ROOT_UID, extra_groups=[],
        env={"PATH": "/usr/bin:/bin", **canary}, cwd="/", capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["uid"] == NON_ROOT_UID
    if not {"pidns", "procfs"} <= set(report["isolation"]):
        pytest.skip(f"{NOT_CONTAINED}: isolation {report['isolation']}")
    scores = {(name, task): score for name, task, score in report["scores"]}
    for name in NON_ROOT_ATTACKS:
        assert {task: scores[name, task] for task in TASKS} == dict.fromkeys(TASKS, 0.0), name
    assert {task: scores["honest", task] for task in TASKS} == dict.fromkeys(TASKS, 1.0)
    assert scores["partial", "mbpp"] == pytest.approx(2 / 3)
    verdicts, stdout, stderr = report["probe"]
    assert verdicts == [True], stderr
    assert "REACHED []" in stdout, stdout
