"""Run untrusted Python (model-written code) in a confined child process.

What `run_untrusted` guarantees, whoever runs the trainer:
- a separate process (`python -I`: no user site, no PYTHON* variables, no cwd on sys.path) with
  a minimal environment, no inherited file descriptors and no memory shared with the trainer;
- a fresh scratch directory as cwd, HOME and TMPDIR, deleted afterwards;
- a wall-clock deadline, after which the program and everything it started are SIGKILLed;
- resource limits: address space (memory), CPU seconds, processes, file size, open files, no
  core dumps, and no regaining privileges through setuid binaries (no_new_privs);
- output read from files, never pipes, and capped: a flood cannot fill the trainer's memory;
- no path of ours to find: the config, the tests, stdin, stdout, stderr and the report are
  files with no name (O_TMPFILE; where a filesystem lacks it, unlinked as soon as made),
  handed over as descriptors, never named in argv.

Where the kernel allows it (root, or unprivileged user namespaces), also:
- an empty network namespace: no connection can leave, not even to 127.0.0.1;
- a PID namespace: when the run ends, the kernel kills and reaps every process in it, even ones
  that left the process group, and no zombie is left to the system's init;
- a mount namespace with a /proc of the run's processes only (the trainer's memory, descriptors,
  environment and command line are out of sight) and empty tmpfs mounts over the temp dirs,
  /run and the trainer's home, with the scratch dir and the interpreter's paths bound back.
When the trainer runs as root, the program also runs as a throwaway uid (`sandbox_users`): it
cannot write outside its scratch and the shared temp dirs (whose leftovers are removed),
RLIMIT_NPROC becomes a per-run budget, and its processes can be found and killed by uid.
Python-level socket creation is refused in every case, a fallback for machines without network
namespaces. `SandboxResult.isolation` lists what applied; `sandbox_launcher` runs the child side.

Without root the program runs as the trainer's own uid: it can read whatever files that user can
read outside the hidden directories (a dataset elsewhere on disk, the repository). From inside a
user namespace the kernel refuses it the trainer's /proc/<pid>/mem, environ and fds (as for
ptrace); where no user namespace can be made (no "userns" in `isolation`), nothing stands
between the program and the trainer's memory, tests included, and a warning is logged once.

`run_tests` runs a program against trusted test statements so that the program cannot forge its
score: the tests run in a separate process that calls the program's functions over pipes with
plain data only, and that process alone reports verdicts to the supervisor (`code_harness`).
"""

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from jaxpt.rewards import sandbox_users

logger = logging.getLogger(__name__)

_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")
_MAX_OPEN_FILES = 256
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
# The supervisor enforces the deadline itself; ours is only a backstop.
_SUPERVISOR_GRACE_S = 5.0
# Covered by an empty tmpfs in the program's mount namespace, where one can be made, with
# tempfile's dir and the trainer's home (dataset caches): the temp dirs hold other runs' scratch
# dirs and sockets, /run the user's session bus. The scratch dir and the interpreter's own paths
# stay visible.
_HIDDEN_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run did.

    `killed_reason` is None for a normal exit (whatever the return code), "timeout" when the wall
    clock ran out, "cpu_limit" for RLIMIT_CPU, otherwise the name of the fatal signal.
    `isolation` lists the protections that applied, e.g. ("netns", "rlimits", "uid=64200").
    `verdicts` (from `run_tests` only) holds one bool per test, True where the test passed; a
    test that never ran (timeout, failed setup, the program died) counts as failed.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None
    wall_s: float
    isolation: tuple[str, ...] = ()
    verdicts: tuple[bool, ...] = ()

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_reason is None


def run_untrusted(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_output_bytes: int = 64 * 1024,
    max_file_mb: int = 16,
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as a Python program in the sandbox and return its exit status and output.

    Args:
      code: program source; runs as `__main__`, file name "solution.py".
      stdin: text fed to the program's standard input.
      timeout_s: wall-clock limit; the program and its descendants are SIGKILLed at the end.
      memory_mb: address-space limit per process (RLIMIT_AS); allocations beyond it raise
        MemoryError.
      max_processes: RLIMIT_NPROC. The kernel counts it per user: a per-run budget under the
        throwaway uid (root trainer); otherwise the user's other processes and threads may
        count too, and forking can fail outright.
      max_output_bytes: stdout and stderr are each cut to this many bytes (head and tail kept).
      max_file_mb: largest file the program may write (RLIMIT_FSIZE, stdout included).
      python: interpreter to run; default `default_python()`.
    """
    limits = _limits(timeout_s, memory_mb, max_processes, max_output_bytes, max_file_mb)
    return _run_leased(code, stdin, timeout_s, limits, max_output_bytes, python, tests=None)


def run_tests(
    code: str,
    tests: Sequence[tuple[bool, str]],
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_output_bytes: int = 64 * 1024,
    max_file_mb: int = 16,
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as `__main__` in the sandbox, then judge it with `tests`; see `verdicts`.

    `tests` are trusted statements `(is_test, source)`, run in order in a separate sandboxed
    process where each callable the program defines is a stub that calls it (`code_harness`:
    arguments and results pass by value, as plain data). A statement with `is_test` is one
    test: it passes when it raises nothing. Any other statement is setup (imports, helpers);
    when one fails, the remaining tests fail. HumanEval's `def check(candidate)` followed by
    `check(f)` is one test. The program's own output and exit status do not count; `timeout_s`
    bounds the whole run, program and tests together. Other arguments as for `run_untrusted`.
    """
    tests = [(bool(is_test), str(source)) for is_test, source in tests]
    limits = _limits(timeout_s, memory_mb, max_processes, max_output_bytes, max_file_mb)
    return _run_leased(code, "", timeout_s, limits, max_output_bytes, python, tests=tests)


def _run_leased(code, stdin, timeout_s, limits, max_output_bytes, python, tests) -> SandboxResult:
    python = python or default_python()
    run = functools.partial(_run, code, stdin, timeout_s, limits, max_output_bytes, python, tests)
    if os.geteuid() != 0:
        return run(uid=None)
    with sandbox_users.lease_uid() as uid:
        try:
            return run(uid=uid)
        finally:
            sandbox_users.remove_files(uid)


@functools.cache
def default_python() -> str:
    """The interpreter for sandboxed programs: ours, unless the sandbox uid cannot start it.

    Under root the program runs as another uid, which cannot read e.g. a pyenv install in
    /root; then the system python3 is used (without the trainer's virtualenv packages).
    """
    if os.geteuid() != 0:
        return sys.executable
    system_python = shutil.which("python3", path=_SYSTEM_PATH)
    for candidate in (sys.executable, system_python):
        if candidate and _usable_by_sandbox_uid(candidate):
            return candidate
    raise RuntimeError(
        "no Python interpreter can be started by the sandbox uid (unreadable install, or "
        "switching uid is not permitted here); pass python=... to run_untrusted"
    )


def _run(code, stdin, timeout_s, limits, max_output_bytes, python, tests, *, uid) -> SandboxResult:
    scratch = tempfile.mkdtemp(prefix="jaxpt-sandbox-")
    try:
        if uid is not None:
            os.chown(scratch, uid, uid)
        with contextlib.ExitStack() as stack:
            # Files with no name: the program cannot find them by path, and only the processes
            # we hand a descriptor to can open them.
            def unnamed(data: bytes = b""):
                f = stack.enter_context(tempfile.TemporaryFile())
                f.write(data)
                f.flush()
                f.seek(0)
                return f

            stdin_file = unnamed(stdin.encode("utf-8", errors="replace"))
            stdout_file, stderr_file, report_file = unnamed(), unnamed(), unnamed()
            tests_file = None if tests is None else unnamed(json.dumps(tests).encode())
            config = {
                "source": code,
                "report_fd": report_file.fileno(),  # written once everything else is dead
                "tests_fd": None if tests_file is None else tests_file.fileno(),
                "uid": uid,
                "limits": limits,
                "timeout_s": timeout_s,
                "hide": [*_HIDDEN_DIRS, tempfile.gettempdir(), os.path.expanduser("~")],
            }
            config_file = unnamed(json.dumps(config).encode())
            # Descriptor numbers only: /proc/<pid>/cmdline is readable by every uid.
            argv = [python, "-I", "-X", "utf8", _LAUNCHER, str(config_file.fileno())]
            secrets = [config_file] + ([tests_file] if tests_file else [])
            returncode, timed_out, wall_s = _spawn_and_wait(
                argv, (stdin_file, stdout_file, stderr_file), secrets, report_file, scratch,
                timeout_s + _SUPERVISOR_GRACE_S, uid, python,
            )  # fmt: skip
            report = _read_report(report_file)
            if report is not None:  # the supervisor's account, more precise than ours
                returncode, timed_out = report["returncode"], report["timed_out"]
                wall_s = report["wall_s"]
            isolation = tuple(report["isolation"]) if report else ()
            if uid is None and report is not None and "userns" not in isolation:
                _warn_exposed_trainer()
            return SandboxResult(
                returncode=returncode,
                stdout=_read_capped(stdout_file, max_output_bytes),
                stderr=_read_capped(stderr_file, max_output_bytes),
                timed_out=timed_out,
                killed_reason=_killed_reason(returncode, timed_out),
                wall_s=wall_s,
                isolation=isolation,
                verdicts=_verdicts(report, tests),
            )
    finally:
        _remove_tree(scratch)


@functools.cache
def _warn_exposed_trainer() -> None:
    logger.warning(
        "sandboxed programs run as the trainer's uid and no user namespace could be made: "
        "they can read the trainer's memory and environment (the tests included) and write to "
        "its open files; run the trainer as root or allow unprivileged user namespaces"
    )


def _spawn_and_wait(argv, stdio, secrets, report, scratch, timeout_s, uid, python):
    """Run the supervisor; kill its group if it outlives `timeout_s` (it enforces its own).

    `stdio` are its stdin, stdout and stderr files; it gets `secrets` (config, tests) and
    `report` by descriptor number. Our copies of `secrets` are closed once it holds them.
    Returns (return code, whether we timed out, wall seconds).
    """
    stdin, stdout, stderr = stdio
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=stdout,  # files, not pipes: nothing to drain, and no hang on a leaked fd
        stderr=stderr,
        cwd=scratch,
        env=_child_env(scratch),
        close_fds=True,
        pass_fds=[f.fileno() for f in (*secrets, report)],
        start_new_session=True,  # its own process group, killable as one
    )
    for f in secrets:
        f.close()
    timed_out = False
    try:
        try:
            returncode = _wait(proc, timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            returncode = proc.wait()
        wall_s = time.monotonic() - started
    finally:
        if proc.returncode is None:  # interrupted (e.g. KeyboardInterrupt) while waiting
            _kill_group(proc.pid)
            proc.wait()
        # No killpg once it is reaped: its pid, and so the group id, may belong to another
        # process by now. The supervisor has cleaned up; processes of the uid are a backstop.
        if uid is not None and not sandbox_users.kill_all(uid, python):
            logger.error("sandbox uid %d still has processes after SIGKILL", uid)
    return returncode, timed_out, wall_s


def _wait(proc: subprocess.Popen, timeout_s: float) -> int:
    """proc.wait(timeout_s), woken by a pidfd at exit rather than polling every 50 ms."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Linux < 5.3
        return proc.wait(timeout=timeout_s)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(timeout_s * 1000):
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
    finally:
        os.close(pidfd)
    return proc.wait()


def _limits(timeout_s, memory_mb, max_processes, max_output_bytes, max_file_mb) -> dict:
    memory = memory_mb * 2**20
    file_size = max(max_file_mb * 2**20, max_output_bytes)
    # CPU time is a backstop for processes that outlive the wall clock; SIGXCPU, then SIGKILL.
    cpu_s = math.ceil(timeout_s) + 1
    return {
        "RLIMIT_AS": (memory, memory),
        "RLIMIT_CPU": (cpu_s, cpu_s + 1),
        "RLIMIT_NPROC": (max_processes, max_processes),
        "RLIMIT_FSIZE": (file_size, file_size),
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_NOFILE": (_MAX_OPEN_FILES, _MAX_OPEN_FILES),
    }


def _child_env(scratch: str) -> dict[str, str]:
    return {
        "PATH": _SYSTEM_PATH,
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # One thread per library: each thread's malloc arena eats into RLIMIT_AS.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
    }


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _killed_reason(returncode: int, timed_out: bool) -> str | None:
    if timed_out:
        return "timeout"
    if returncode >= 0:
        return None
    if -returncode == signal.SIGXCPU:
        return "cpu_limit"
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _read_capped(f, limit: int) -> str:
    """The file's text, or its head and tail with a marker when longer than `limit` bytes."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    if size <= limit:
        data = f.read()
    else:
        # Keep the tail too: tracebacks and final results come last.
        head = f.read(limit // 2)
        f.seek(size - (limit - limit // 2))
        marker = f"\n...[{size - limit} bytes truncated]...\n".encode()
        data = head + marker + f.read()
    return data.decode("utf-8", errors="replace")


def _read_report(f) -> dict | None:
    """The supervisor's report; None when it died before writing it, or wrote garbage."""
    try:
        f.seek(0)
        report = json.loads(f.read(1 << 20))
        return {
            "returncode": int(report["returncode"]),
            "timed_out": bool(report["timed_out"]),
            "wall_s": float(report["wall_s"]),
            "isolation": [str(item) for item in report["isolation"]],
            "verdicts": str(report.get("verdicts") or ""),
        }
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _verdicts(report: dict | None, tests) -> tuple[bool, ...]:
    """One bool per test; the runner's b"P"/b"F" in order, missing ones failed."""
    if tests is None:
        return ()
    reported = report["verdicts"] if report else ""
    count = sum(is_test for is_test, _ in tests)
    return tuple(index < len(reported) and reported[index] == "P" for index in range(count))


def _remove_tree(path: str, passes: int = 10) -> None:
    """rmtree that also gets through directories the program made unreadable (chmod 000)."""

    def allow_access(func, failed_path, exc_info):
        for target in (os.path.dirname(failed_path), failed_path):
            # Never touch anything outside the tree, nor follow a link the program planted.
            if os.path.commonpath([path, target]) != path or os.path.islink(target):
                continue
            try:
                os.chmod(target, 0o700)
            except OSError:
                pass

    for _ in range(passes):
        shutil.rmtree(path, onerror=allow_access)
        if not os.path.lexists(path):
            return
    logger.warning("could not remove sandbox scratch directory %s", path)


def _usable_by_sandbox_uid(python: str) -> bool:
    with sandbox_users.lease_uid() as uid:
        try:
            probe = subprocess.run(
                [python, "-I", "-c", "import textwrap, json"],  # imports read the stdlib
                check=False,
                user=uid,
                group=uid,
                extra_groups=[],
                env={"PATH": _SYSTEM_PATH},
                cwd="/",
                close_fds=True,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return False
    return probe.returncode == 0
