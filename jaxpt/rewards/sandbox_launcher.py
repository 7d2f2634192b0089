"""Child side of the code sandbox: a small supervisor that confines and runs the program.

`jaxpt.rewards.sandbox` starts this file as `python -I sandbox_launcher.py CONFIG_JSON` in a new
session, with the scratch directory as cwd. It uses only the standard library and never imports
jaxpt: it runs under whichever interpreter the sandbox was given.

Three processes, so that nothing the program starts can outlive the run:
  supervisor  (this process) enters new network and PID namespaces where allowed, is a child
              subreaper, enforces the wall-clock deadline and writes the report;
  init        PID 1 of the new PID namespace: reaps orphans; when it exits, the kernel kills and
              reaps everything left in the namespace, even processes that called setsid;
  program     sets resource limits, drops privileges (the throwaway uid when we are root), then
              runs the untrusted code as `__main__`.
Without a PID namespace the program is the supervisor's direct child, and the supervisor kills
its process group (and, under root, every process of its uid) and reaps the orphans itself.
The supervisor and init run only this file's code; under root the program cannot signal them.
"""

import builtins
import ctypes
import errno
import json
import os
import resource
import signal
import sys
import time
import traceback
import types

_CLONE_NEWNET = 0x40000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_EXIT_SETUP_FAILED = 125
_REAP_GRACE_S = 1.0  # how long to wait for stragglers that could not be killed


def main() -> None:
    config = json.loads(sys.argv[1])
    with open(config["program"], encoding="utf-8") as f:
        source = f.read()  # read now: the program's uid cannot read the trainer's files
    libc = _libc()
    namespaces = _unshare_namespaces(libc, as_root=os.geteuid() == 0)
    _prctl(libc, _PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us, not to the system's init
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # for sigtimedwait below
    status_read, status_write = os.pipe()
    started = time.monotonic()
    child = os.fork()
    if child == 0:
        os.close(status_read)
        if "pidns" in namespaces:
            _namespace_init(config, source, libc, status_write)
        os.close(status_write)
        _program(config, source, libc)  # raises SystemExit: the interpreter exits normally
    os.close(status_write)
    wait_status, timed_out = _wait_until(child, config["timeout_s"])
    wall_s = time.monotonic() - started
    if "pidns" not in namespaces:
        _kill_leftovers(child, config["uid"])
    _reap_orphans()
    if "pidns" in namespaces:
        reported = os.read(status_read, 64)  # empty when init was killed at the deadline
        wait_status = int(reported) if reported else None
    returncode = -signal.SIGKILL if wait_status is None else os.waitstatus_to_exitcode(wait_status)
    isolation = namespaces + ["rlimits", "no_new_privs"]
    if config["uid"] is not None:
        isolation.append(f"uid={config['uid']}")
    report = {"returncode": returncode, "timed_out": timed_out, "wall_s": wall_s,
              "isolation": isolation}  # fmt: skip
    with open(config["report"], "w") as f:
        json.dump(report, f)
    os._exit(returncode if returncode >= 0 else 128 - returncode)


def _unshare_namespaces(libc, as_root: bool) -> list[str]:
    """Enter new network and PID namespaces, as many as this machine allows."""
    attempts = [
        (_CLONE_NEWNET | _CLONE_NEWPID, ["netns", "pidns"]),
        (_CLONE_NEWNET, ["netns"]),
        (_CLONE_NEWPID, ["pidns"]),
    ]
    if not as_root:
        # An unprivileged user may own namespaces inside a user namespace of its own. Not for
        # root: the program could not switch to the throwaway uid inside one.
        attempts = [(_CLONE_NEWUSER | flags, ["userns", *names]) for flags, names in attempts]
    for flags, names in attempts:
        if libc is not None and libc.unshare(flags) == 0:
            return names
    return []


def _wait_until(pid: int, timeout_s: float) -> tuple[int | None, bool]:
    """Wait for `pid`, SIGKILLing it at the deadline: (wait status, whether it timed out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)  # for a namespace's init, this takes the namespace down
            os.waitpid(pid, 0)
            return None, True
        signal.sigtimedwait({signal.SIGCHLD}, remaining)


def _namespace_init(config, source, libc, status_write: int) -> None:
    """PID 1 of the new namespace: run the program, reap, report its status, exit."""
    _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)  # supervisor killed: end the namespace
    program = os.fork()
    if program == 0:
        os.close(status_write)
        _program(config, source, libc)
    while True:
        reaped, status = os.wait()  # any child: orphans in the namespace are ours to reap
        if reaped == program:
            os.write(status_write, str(status).encode())
            os._exit(0)  # the kernel kills and reaps whatever is left in the namespace


def _kill_leftovers(program: int, uid: int | None) -> None:
    try:
        os.killpg(program, signal.SIGKILL)  # the program leads its own process group
    except OSError:
        pass
    if uid is None:
        return
    # Also processes that left the group: kill(-1) as `uid` hits exactly that user's processes.
    helper = os.fork()
    if helper == 0:
        try:
            _drop_privileges(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


def _reap_orphans() -> None:
    deadline = time.monotonic() + _REAP_GRACE_S
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            signal.sigtimedwait({signal.SIGCHLD}, 0.05)


def _program(config, source, libc) -> None:
    try:
        os.setpgid(0, 0)  # its own group, so the program and its children die as one
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        _set_limits(config["limits"])
        if _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1) != 0:
            raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")  # setuid binaries stay inert
        if config["uid"] is not None:
            _drop_privileges(config["uid"])
        _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which resets it
        os.umask(0o077)
        _block_sockets()
    except Exception as exc:  # noqa: BLE001
        # Fail closed: never run untrusted code with more rights than asked for.
        print(f"sandbox setup failed: {exc!r}", file=sys.stderr, flush=True)
        os._exit(_EXIT_SETUP_FAILED)
    _run_program(source)


def _run_program(source: str) -> None:
    main_module = types.ModuleType("__main__")
    main_module.__file__ = "solution.py"
    main_module.__builtins__ = builtins
    sys.modules["__main__"] = main_module
    sys.argv = ["solution.py"]
    try:
        code = compile(source, "solution.py", "exec")
    except (SyntaxError, ValueError) as exc:
        traceback.print_exception(exc, limit=0)
        sys.exit(1)
    try:
        exec(code, main_module.__dict__)  # noqa: S102 -- running the program is the point
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 -- reported, then exit 1 like Python does
        # Show the program's frames only, as if it had been run as a script.
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.exit(1)
    sys.exit(0)


def _set_limits(limits: dict) -> None:
    for name, (soft, hard) in limits.items():
        kind = getattr(resource, name)
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:
            # Without privileges a hard limit can only go down.
            hard = current_hard if hard == resource.RLIM_INFINITY else min(hard, current_hard)
            soft = min(soft, hard)
        resource.setrlimit(kind, (soft, hard))


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)  # sets the real, effective and saved ids: there is no way back
    if os.getuid() != uid or os.geteuid() != uid or os.getegid() != uid:
        raise OSError("privileges were not dropped")


def _block_sockets() -> None:
    """Refuse internet sockets inside Python.

    A fallback for when no network namespace could be made; determined code can get around it
    (ctypes, the original type through the class hierarchy), so it is not the main barrier.
    """
    import _socket
    import socket

    original_init = socket.socket.__init__

    def guarded_init(self, family=-1, type=-1, proto=-1, fileno=None):
        # AF_UNIX socket pairs stay allowed: asyncio needs one for its event loop.
        if fileno is None and family != socket.AF_UNIX:
            raise PermissionError(errno.EACCES, "network access is disabled in the sandbox")
        original_init(self, family, type, proto, fileno)

    socket.socket.__init__ = guarded_init
    _socket.socket = _socket.SocketType = socket.socket


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _prctl(libc, option: int, value: int) -> int:
    return -1 if libc is None else libc.prctl(option, value, 0, 0, 0)


if __name__ == "__main__":
    main()
