"""Run untrusted Python (model-written code) in a confined child process.

What `run_untrusted` guarantees, whoever runs the trainer:
- a separate process (`python -I`: no user site, no PYTHON* variables, no cwd on sys.path) with
  a minimal environment, no inherited file descriptors and no memory shared with the trainer;
- a fresh scratch directory as cwd, HOME and TMPDIR, deleted afterwards;
- a wall-clock deadline, after which the program and everything it started are SIGKILLed;
- resource limits: address space (memory), CPU seconds, processes, file size, open files, no
  core dumps, and no regaining privileges through setuid binaries (no_new_privs);
- output read from files, never pipes, and capped: a flood cannot fill the trainer's memory.

Where the kernel allows it (root, or unprivileged user namespaces), also:
- an empty network namespace: no connection can leave, not even to 127.0.0.1;
- a PID namespace: when the run ends, the kernel kills and reaps every process in it, even ones
  that left the process group, and no zombie is left to the system's init.
When the trainer runs as root, the program also runs as a throwaway uid (`sandbox_users`): it
cannot write outside its scratch and the shared temp dirs (whose leftovers are removed),
RLIMIT_NPROC becomes a per-run budget, and its processes can be found and killed by uid.
Python-level socket creation is refused in every case, a fallback for machines without network
namespaces. `SandboxResult.isolation` lists what applied; `sandbox_launcher` runs the child side.
"""

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

from jaxpt.rewards import sandbox_users

logger = logging.getLogger(__name__)

_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")
_MAX_OPEN_FILES = 256
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
# The supervisor enforces the deadline itself; ours is only a backstop.
_SUPERVISOR_GRACE_S = 5.0


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run did.

    `killed_reason` is None for a normal exit (whatever the return code), "timeout" when the wall
    clock ran out, "cpu_limit" for RLIMIT_CPU, otherwise the name of the fatal signal.
    `isolation` lists the protections that applied, e.g. ("netns", "rlimits", "uid=64200").
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None
    wall_s: float
    isolation: tuple[str, ...] = ()

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
    python = python or default_python()
    limits = _limits(timeout_s, memory_mb, max_processes, max_output_bytes, max_file_mb)
    run = functools.partial(_run, code, stdin, timeout_s, limits, max_output_bytes, python)
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


def _run(code, stdin, timeout_s, limits, max_output_bytes, python, *, uid) -> SandboxResult:
    with tempfile.TemporaryDirectory(prefix="jaxpt-sandbox-control-") as control:
        # `control` is the trainer's (mode 0700): the program never sees these files by path.
        scratch = tempfile.mkdtemp(prefix="jaxpt-sandbox-")
        try:
            if uid is not None:
                os.chown(scratch, uid, uid)
            paths = {
                name: os.path.join(control, name)
                for name in ("program.py", "stdin", "stdout", "stderr", "report")
            }
            with open(paths["program.py"], "w", encoding="utf-8", errors="replace") as f:
                f.write(code)
            with open(paths["stdin"], "w", encoding="utf-8", errors="replace") as f:
                f.write(stdin)
            config = {
                "program": paths["program.py"],
                "report": paths["report"],
                "uid": uid,
                "limits": limits,
                "timeout_s": timeout_s,
            }
            argv = [python, "-I", "-X", "utf8", _LAUNCHER, json.dumps(config)]
            returncode, timed_out, wall_s = _spawn_and_wait(
                argv, paths, scratch, timeout_s + _SUPERVISOR_GRACE_S, uid, python
            )
            report = _read_report(paths["report"])
            if report is not None:  # the supervisor's account, more precise than ours
                returncode, timed_out = report["returncode"], report["timed_out"]
                wall_s = report["wall_s"]
            return SandboxResult(
                returncode=returncode,
                stdout=_read_capped(paths["stdout"], max_output_bytes),
                stderr=_read_capped(paths["stderr"], max_output_bytes),
                timed_out=timed_out,
                killed_reason=_killed_reason(returncode, timed_out),
                wall_s=wall_s,
                isolation=tuple(report["isolation"]) if report else (),
            )
        finally:
            _remove_tree(scratch)


def _spawn_and_wait(argv, paths, scratch, timeout_s, uid, python) -> tuple[int, bool, float]:
    """Run the supervisor; kill its group if it outlives `timeout_s` (it enforces its own)."""
    with (
        open(paths["stdin"], "rb") as stdin,
        open(paths["stdout"], "wb") as stdout,
        open(paths["stderr"], "wb") as stderr,
    ):
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout,  # files, not pipes: nothing to drain, and no hang on a leaked fd
            stderr=stderr,
            cwd=scratch,
            env=_child_env(scratch),
            close_fds=True,
            start_new_session=True,  # its own process group, killable as one
        )
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


def _read_capped(path: str, limit: int) -> str:
    """The file's text, or its head and tail with a marker when longer than `limit` bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= limit:
            data = f.read()
        else:
            # Keep the tail too: tracebacks and final results come last.
            head = f.read(limit // 2)
            f.seek(size - (limit - limit // 2))
            marker = f"\n...[{size - limit} bytes truncated]...\n".encode()
            data = head + marker + f.read()
    return data.decode("utf-8", errors="replace")


def _read_report(path: str) -> dict | None:
    try:
        with open(path) as f:
            report = json.load(f)
        return {
            "returncode": int(report["returncode"]),
            "timed_out": bool(report["timed_out"]),
            "wall_s": float(report["wall_s"]),
            "isolation": [str(item) for item in report["isolation"]],
        }
    except (OSError, ValueError, TypeError, KeyError):
        return None  # the supervisor died before writing it


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
