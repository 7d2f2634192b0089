"""The code sandbox contains hostile programs, and code_reward scores through it."""

import ast
import os
import socket
import tempfile
import textwrap
import time

import pytest

from jaxpt.rewards import code_reward, run_untrusted
from jaxpt.rewards.sandbox_users import SANDBOX_UIDS

IS_ROOT = os.geteuid() == 0


def _sandbox_processes() -> list[int]:
    """Pids of live processes owned by any sandbox uid (only meaningful under root)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid in SANDBOX_UIDS:
                    with open(f"/proc/{name}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                            pids.append(int(name))
            except OSError:
                continue
    return pids


def _process_count() -> int:
    return sum(name.isdigit() for name in os.listdir("/proc"))


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
    assert result.wall_s < 2.0
    assert time.monotonic() - started < 3.0


def test_fork_bomb_is_contained():
    before = _process_count()
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
    assert time.monotonic() - started < 5.0
    assert not result.ok
    if IS_ROOT:
        assert _sandbox_processes() == []
    # Back to normal (a little slack for unrelated processes on the machine).
    assert _process_count() <= before + 3


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
    assert _sandbox_processes() == []


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
    scratch, outcome = result.stdout.split()
    assert scratch.startswith(tempfile.gettempdir())
    assert not os.path.exists(scratch)
    if IS_ROOT:  # a throwaway uid cannot write into the trainer's directories
        assert outcome == "DENIED"
        assert not outside.exists()


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
