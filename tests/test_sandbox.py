"""The code sandbox contains hostile programs, and code_reward scores through it."""

import ast
import math
import os
import socket
import tempfile
import textwrap
import time
from collections import Counter, OrderedDict

import pytest

from jaxpt.rewards import code_harness, code_reward, run_untrusted
from jaxpt.rewards.sandbox import run_tests

IS_ROOT = os.geteuid() == 0
# Timing bounds are for a shared, busy machine: they catch a deadline that is not enforced at
# all, not a slow one.
SLACK = 10


def _survivors(result) -> list[int]:
    """Live processes of the run's sandbox uid that started before the run returned.

    Under root each run has its own uid; a later run may lease the same uid, so processes that
    started after this call are someone else's. Without root there is no uid to look for.
    """
    uids = [int(item.split("=")[1]) for item in result.isolation if item.startswith("uid=")]
    if not uids:
        return []
    now_ticks = time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK")
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uids[0]:
                continue
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        state, start_ticks = fields[0], int(fields[19])
        if state not in ("Z", "X") and start_ticks <= now_ticks:
            pids.append(int(name))
    return pids


def test_runs_a_program_with_stdin():
    result = run_untrusted("import sys\nprint(sys.stdin.read().upper())", stdin="hello")
    assert result.ok, result.stderr
    assert result.stdout == "HELLO\n"
    assert not result.timed_out and result.killed_reason is None
    assert "rlimits" in result.isolation


def test_syntax_error_is_a_failed_run():
    result = run_untrusted("def f(:\n    pass")
    assert result.returncode == 1
    assert "SyntaxError" in result.stderr
    assert "sandbox_launcher" not in result.stderr  # only the program's own frames


def test_infinite_loop_is_killed_at_the_wall_clock_limit():
    started = time.monotonic()
    result = run_untrusted("while True:\n    pass", timeout_s=1.0)
    assert result.timed_out and result.killed_reason == "timeout"
    assert not result.ok
    assert result.wall_s >= 1.0  # not killed before its time
    assert time.monotonic() - started < SLACK * 1.0
    assert _survivors(result) == []


def test_fork_bomb_is_contained():
    bomb = textwrap.dedent(
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """
    )
    started = time.monotonic()
    result = run_untrusted(bomb, timeout_s=1.0, max_processes=16)
    assert time.monotonic() - started < SLACK * 2.0
    assert not result.ok
    assert _survivors(result) == []  # with a PID namespace, the kernel also guarantees it


@pytest.mark.skipif(not IS_ROOT, reason="finding escaped processes needs a throwaway uid")
def test_processes_that_leave_the_group_are_killed():
    escape = textwrap.dedent(
        """
        import os, time
        if os.fork() == 0:
            os.setsid()  # out of the sandbox's process group
            time.sleep(60)
        """
    )
    result = run_untrusted(escape, timeout_s=2.0)
    assert result.ok, result.stderr
    assert any(item.startswith("uid=") for item in result.isolation)
    assert _survivors(result) == []


def test_over_allocation_fails():
    result = run_untrusted("x = bytearray(512 * 2**20)\nprint('allocated')", memory_mb=256)
    assert not result.ok
    assert "allocated" not in result.stdout
    assert "MemoryError" in result.stderr or result.killed_reason is not None


def test_network_is_blocked():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        program = textwrap.dedent(
            f"""
            import socket
            def connect(make_socket):
                try:
                    s = make_socket()
                    s.settimeout(2)
                    s.connect(("127.0.0.1", {port}))
                    print("CONNECTED")
                except OSError as e:
                    print("BLOCKED", e)
            connect(socket.socket)
            # Around the Python-level guard: only a network namespace stops this one.
            connect(socket.socket.__mro__[1])
            """
        )
        result = run_untrusted(program, timeout_s=5.0)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody reached the trainer's listening socket
    lines = result.stdout.splitlines()
    assert lines[0].startswith("BLOCKED"), result.stdout + result.stderr
    if any("netns" in item for item in result.isolation):
        assert lines[1].startswith("BLOCKED"), result.stdout


def test_scratch_dir_is_private_and_removed(tmp_path):
    outside = tmp_path / "escape.txt"
    program = textwrap.dedent(
        f"""
        import os
        open("inside.txt", "w").write("ok")
        print(os.getcwd())
        try:
            open({str(outside)!r}, "w").write("escaped")
            print("WROTE OUTSIDE")
        except OSError:
            print("DENIED")
        """
    )
    result = run_untrusted(program)
    assert result.ok, result.stderr
    scratch, outcome = result.stdout.split(maxsplit=1)
    assert scratch.startswith(tempfile.gettempdir())
    assert not os.path.exists(scratch)
    # A throwaway uid cannot write into the trainer's directories; a tmpfs over the temp dir
    # (where pytest's tmp_path is) hides them.
    if IS_ROOT or f"hide={os.path.realpath(tempfile.gettempdir())}" in result.isolation:
        assert outcome.strip() == "DENIED"
        assert not outside.exists()


def test_trainer_and_its_files_are_out_of_sight(monkeypatch, tmp_path):
    """Not in argv, not under a path, not among the visible processes: the tests stay unseen."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "dataset.jsonl").write_text("assert f(1) == 'canary-answer'")
    monkeypatch.setenv("HOME", str(home))  # the trainer's home: hidden like the temp dirs
    # A trainer's file at the top of the temp dir. (Other entries may be visible there: the
    # interpreter's and the launcher's own paths are bound back when they live under it.)
    with tempfile.NamedTemporaryFile("w", prefix="jaxpt-trainer-canary-") as trainer_file:
        trainer_file.write("assert f(1) == 'canary-answer'")
        trainer_file.flush()
        result, seen = _look_around(home, trainer_file.name)
    assert result.verdicts == (True,), result.stderr
    assert seen["CANARY"] == "False"  # no test in any command line we can read
    if "procfs" in result.isolation:  # only the run's own processes: session and runner
        assert seen["PIDS"] == "2" and seen["TRAINER"] == "False"
    hidden = {item.split("=", 1)[1] for item in result.isolation if item.startswith("hide=")}
    if os.path.realpath(tempfile.gettempdir()) in hidden:
        assert seen["TMP_FILE"] == "False"  # the trainer's temp file is out of sight
        assert seen["OTHER_SCRATCH"] == "False"  # and so are other runs' scratch dirs
        assert seen["HOME"] == "False"
    if "pidns" in result.isolation and (IS_ROOT or "userns" in result.isolation):
        # A mount namespace can always follow (a fresh /proc may be refused, e.g. in containers
        # that mask parts of theirs).
        assert "mntns" in result.isolation


def _look_around(home, trainer_file: str):
    """Run a program that reports what it can see of the trainer; (result, {what: seen})."""
    program = textwrap.dedent(
        f"""
        import os
        me = os.readlink("/proc/self")
        pids = [pid for pid in os.listdir("/proc") if pid.isdigit() and pid != me]
        cmdlines = []
        for pid in pids:
            try:
                cmdlines.append(open(f"/proc/{{pid}}/cmdline", "rb").read())
            except OSError:
                pass
        print("PIDS", len(pids))
        print("CANARY", any(b"canary" in line for line in cmdlines))
        print("TRAINER", any(b"pytest" in line for line in cmdlines))
        print("HOME", os.path.exists({str(home / "dataset.jsonl")!r}))
        print("TMP_FILE", os.path.exists({trainer_file!r}))
        print("OTHER_SCRATCH", any(
            name.startswith("jaxpt-sandbox-") and name != os.path.basename(os.getcwd())
            for name in os.listdir({tempfile.gettempdir()!r})
        ))

        def f(x):
            return "canary-answer"
        """
    )
    result = run_tests(program, [(True, "assert f(1) == 'canary-answer'")], timeout_s=10.0)
    return result, dict(line.split(" ", 1) for line in result.stdout.splitlines())


def test_no_inherited_fds_or_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXPT_TEST_SECRET", "do-not-leak")
    with open(tmp_path / "held-open", "w"):
        program = "import os\nprint(sorted(os.listdir('/proc/self/fd')))\nprint(dict(os.environ))"
        result = run_untrusted(program)
    assert result.ok, result.stderr
    fds_line, env_line = result.stdout.splitlines()
    assert set(ast.literal_eval(fds_line)) <= {"0", "1", "2", "3"}  # 3: the listdir itself
    assert "do-not-leak" not in env_line


def test_output_is_truncated():
    result = run_untrusted("print('a' * 1_000_000)\nprint('END')", max_output_bytes=1000)
    assert result.ok
    assert len(result.stdout) < 1200
    assert "truncated" in result.stdout
    assert result.stdout.rstrip().endswith("END")  # the tail is kept


# --- code_reward ----------------------------------------------------------------------------

ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4"


def _fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```"


def test_code_reward_with_asserts():
    completions = [
        _fenced("def add(a, b):\n    return a + b"),
        _fenced("def add(a, b):\n    return a - b"),  # wrong
        _fenced("def add(a, b):\n    return a * b"),  # right only for add(2, 2)
        _fenced("def add(a, b)\n    return a + b"),  # syntax error
        "no code at all",
        _fenced("import os\nos._exit(0)"),  # exits 'successfully' before the tests
        _fenced("print('\\n'.join(f'x {i} 1' for i in range(3)))"),  # fakes result lines
        [{"role": "assistant", "content": _fenced("def add(a, b):\n    return b + a")}],
    ]
    scores = code_reward(None, completions, tests=[ADD_TESTS] * len(completions))
    assert scores == [1.0, 0.0, pytest.approx(1 / 3), 0.0, 0.0, 0.0, 0.0, 1.0]
    strict = code_reward(None, completions[:3], tests=[ADD_TESTS] * 3, partial_credit=False)
    assert strict == [1.0, 0.0, 0.0]


def test_code_reward_with_stdin_stdout_cases():
    cases = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6"}]
    completions = [
        _fenced("a, b = map(int, input().split())\nprint(a + b)"),
        _fenced("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)"),
        _fenced("while True: pass"),
    ]
    apps_style = {"inputs": ["2 3\n", "10 -4\n"], "outputs": ["5\n", "6"]}
    one_case = [{"input": "1 1", "output": "2"}]
    scores = code_reward(None, completions, tests=[apps_style, cases, one_case], timeout_s=1)
    assert scores == [1.0, 0.5, 0.0]


def test_code_reward_abstains_without_tests():
    assert code_reward(None, [_fenced("print(1)")], tests=[None]) == [None]


# --- run_tests and its wire format ----------------------------------------------------------

PLAIN_VALUES = [
    None, True, False, 0, -7, 2**64 + 1, -(10**5000), 1.5, -0.0, math.inf, -math.inf, 1e-310,
    3 + 4j, "", "héllo\ud800", b"\x00\xff", [], (), [1, (2, [3])], (1,), {"a": [1]},
    {(1, 2): {3: None}}, {1, "a", (2,)}, frozenset({1, 2}), {frozenset({1}): b""},
    [[[[[]]]]], {"nested": {"set": {1.5}}},
]  # fmt: skip


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=lambda value: type(value).__name__)
def test_plain_values_cross_unchanged(value):
    frame = code_harness.dumps(["ok", code_harness.encode(value)])
    read_fd, write_fd = os.pipe()
    try:
        code_harness.send(write_fd, frame)
        message = code_harness.receive(read_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    decoded = code_harness.decode(message[1])
    assert decoded == value and type(decoded) is type(value)
    if type(value) is float:
        assert math.copysign(1, decoded) == math.copysign(1, value)
    assert math.isnan(code_harness.decode(code_harness.encode(math.nan)))


def test_only_exact_builtin_types_are_sent():
    class MyInt(int):
        pass

    class Anything:
        def __eq__(self, other):
            return True

    for value in (MyInt(3), Anything(), [Anything()], {1: MyInt(1)}, iter([]), range(3)):
        with pytest.raises(TypeError):
            code_harness.encode(value)
    # Dict subclasses that compare like dicts go as plain dicts.
    assert code_harness.decode(code_harness.encode(Counter("aab"))) == {"a": 2, "b": 1}
    assert type(code_harness.decode(code_harness.encode(OrderedDict(x=1)))) is dict
    nested = []
    for _ in range(code_harness.MAX_DEPTH + 1):
        nested = [nested]
    for value in (nested, list(range(code_harness.MAX_NODES + 1)), "x" * (9 * 2**20)):
        with pytest.raises(ValueError):
            code_harness.encode(value)


@pytest.mark.parametrize(
    "tree",
    [
        {"a": 1},  # JSON objects are never values
        [],
        ["?", 1],
        [1, 2],
        ["d", 1],
        ["d", ["l"], 1],  # unhashable key
        ["S", ["l"]],
        ["i", "zz"],
        ["i", 5],
        ["y", "0"],
        ["c", 1.0],
        ["c", "1", "2"],
        ["l", ["l", ["l", {"x": 1}]]],
    ],
    ids=repr,
)
def test_malformed_trees_are_rejected(tree):
    with pytest.raises(code_harness.ProtocolError):
        code_harness.decode(tree)


def test_oversized_or_garbled_frames_are_rejected():
    for raw in (
        (2**31).to_bytes(4, "big"),  # refused before reading a body
        (5).to_bytes(4, "big") + b"[1,2",  # closed in the middle
        (3).to_bytes(4, "big") + b"\xff\xfe[",  # not UTF-8
        (4).to_bytes(4, "big") + b'{"a"',  # not JSON
        (2).to_bytes(4, "big") + b"[]",  # empty message
        (4).to_bytes(4, "big") + b"[[1]",  # truncated JSON
    ):
        read_fd, write_fd = os.pipe()
        os.write(write_fd, raw)
        os.close(write_fd)
        with pytest.raises(code_harness.ProtocolError):
            code_harness.receive(read_fd)
        os.close(read_fd)


def test_run_tests_reports_one_verdict_per_test():
    program = textwrap.dedent(
        """
        import math
        SIZES = [1, 2]
        TABLES = [list(range(5000)) for _ in range(100)]  # too big to offer the tests: skipped

        def pair(a, b=0):
            return (a, b)

        def bad(x):
            raise ValueError(f"bad {x}")

        def grow(items):
            items.append(1)  # not seen by the tests: arguments pass by value
            return len(items)

        print("program output does not count")
        """
    )
    tests = [
        (True, "assert pair(1, b=2) == (1, 2)"),
        (True, "assert pair(1) == [1, 0]"),  # a tuple stays a tuple
        (False, "from math import isclose"),
        (True, "assert isclose(math.sqrt(2), 2 ** 0.5) and SIZES == [1, 2]"),
        (True, "try:\n    bad(3)\nexcept ValueError as e:\n    assert str(e) == 'bad 3'"),
        (True, "assert bad(3)"),
        (True, "items = []\nassert grow(items) == 1 and items == []"),
        (True, "assert pair(lambda: 0) is None"),  # a function cannot be an argument
        (True, "assert pair(2)[0] == 2"),  # still answering after all that
        (True, "TABLES"),
    ]
    result = run_tests(program, tests, timeout_s=10.0)
    expected = (True, False, True, True, False, True, False, True, False)
    assert result.verdicts == expected, result.stderr
    assert result.ok and "does not count" in result.stdout


def test_failed_setup_or_dead_program_fails_the_rest():
    program = "import os\ndef f(x):\n    if x == 2:\n        os._exit(0)\n    return x\n"
    tests = [(True, "assert f(1) == 1"), (True, "assert f(2) == 2"), (True, "assert f(3) == 3")]
    assert run_tests(program, tests, timeout_s=10.0).verdicts == (True, False, False)
    setup_fails = [(True, "assert f(1) == 1"), (False, "import no_such_module"), *tests[2:]]
    assert run_tests(program, setup_fails, timeout_s=10.0).verdicts == (True, False)
    assert run_tests("def f(:\n", tests, timeout_s=10.0).verdicts == (False, False, False)


def test_run_tests_timeout_keeps_earlier_verdicts():
    program = "def f(x):\n    while x == 2:\n        pass\n    return x\n"
    tests = [(True, "assert f(1) == 1"), (True, "assert f(2) == 2"), (True, "assert f(3) == 3")]
    started = time.monotonic()
    result = run_tests(program, tests, timeout_s=1.0)
    assert time.monotonic() - started < SLACK * 1.0
    assert result.timed_out and result.verdicts == (True, False, False)
    assert _survivors(result) == []
