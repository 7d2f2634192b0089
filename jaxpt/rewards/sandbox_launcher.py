"""Child side of the code sandbox: a small supervisor that confines and runs the program.

`jaxpt.rewards.sandbox` starts this file as `python -I sandbox_launcher.py CONFIG_FD` in a new
session, with the scratch directory as cwd. CONFIG_FD is an inherited descriptor of a file with
no name that holds the config (JSON); the tests, when there are any, and the report are two more
such descriptors that the config names by number. Nothing secret is ever in argv (readable by
every uid in /proc/<pid>/cmdline) or under a path. It uses only the standard library and never
imports jaxpt: it runs under whichever interpreter the sandbox was given.

The processes, so that nothing the program starts can outlive the run:
  supervisor  (this process) enters new network, PID and mount namespaces where allowed, is a
              child subreaper, enforces the wall-clock deadline and, once everything else in the
              run is dead, writes the report to its descriptor;
  session     PID 1 of the new PID namespace (else the leader of a new process group): makes the
              mounts private (below), starts the others, reaps orphans, reports the program's exit
              status and exits; when PID 1 exits, the kernel kills and reaps everything left in the
              namespace, even processes that called setsid;
  program     sets resource limits, drops privileges (the throwaway uid when we are root) and
              capabilities, then runs the untrusted code as `__main__`;
  runner      only when there are tests: confined like the program, it reads them from their
              descriptor, runs them against the program through calls over two pipes
              (`code_harness`) and sends one verdict per test to the supervisor on a third pipe,
              which the program never holds.
Without a PID namespace the supervisor kills the session's process group (and, under root, every
process of the sandbox uid) and reaps the orphans itself. The supervisor and session run only
this file's code, as root when we are root, so the program cannot signal them. Only the runner
reads the tests, in its own process: the supervisor and the session pass their descriptor on
unread, and the session closes it before forking the program, whose memory is a copy of the
session's. No secret is needed in the program since it never reports anything itself.
The supervisor makes itself not dumpable before anything else, and every process it forks
inherits that (the runner sets it again after its uid change): a process of the same uid can
neither ptrace them nor open their /proc/<pid>/fd, mem or environ (capabilities are dropped in
the program, which matters inside a user namespace).

Mounts, when the session is PID 1 of a new PID namespace and a mount namespace could be made
(root, or an unprivileged user namespace in which we map our own ids): a fresh /proc, in which
the program sees only the processes of its run (not the trainer's /proc/<pid>/mem, fd, environ
or cmdline); and an empty tmpfs over each directory the config asks to hide (the temp dirs,
/run, the trainer's home), with the scratch directory and the interpreter's own paths bound back
at the same place. Each is best effort: what applied is listed in the report's `isolation`.
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
_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_MNT_DETACH = 2
_TMPFS_INODES = 4096
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_CAPABILITY_VERSION_3 = 0x20080522
_EXIT_SETUP_FAILED = 125
_REAP_GRACE_S = 1.0  # how long to wait for stragglers that could not be killed
_PROGRAM_GRACE_S = 1.0  # how long the program may take to exit once the tests are done
_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "code_harness.py")


def main() -> None:
    libc = _libc()
    # Namespaces first: mapping our ids in a new user namespace writes /proc/self files, which
    # belong to root once we are not dumpable.
    namespaces = _unshare_namespaces(libc, as_root=os.geteuid() == 0)
    # Then, before reading anything: inherited by every process forked from here (a uid change
    # resets it; the runner sets it again), so no process of the program's uid may ptrace them
    # or open their /proc/<pid>/fd, where the config, tests and report descriptors are.
    if _prctl(libc, _PR_SET_DUMPABLE, 0) != 0:
        raise OSError("prctl(PR_SET_DUMPABLE) failed")
    config_fd = int(sys.argv[1])
    config = json.loads(_read_file(config_fd))
    os.close(config_fd)
    source, report_fd, tests_fd = config["source"], config["report_fd"], config["tests_fd"]
    harness = _load_harness() if tests_fd is not None else None
    _prctl(libc, _PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us, not to the system's init
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # for sigtimedwait below
    status_read, status_write = os.pipe()
    verdicts_read, verdicts_write = os.pipe()
    started = time.monotonic()
    session = os.fork()
    if session == 0:
        os.close(status_read)
        os.close(verdicts_read)
        os.close(report_fd)  # only the supervisor writes the report
        _session(config, source, libc, harness, namespaces, status_write, verdicts_write)
    os.close(status_write)
    os.close(verdicts_write)
    if tests_fd is not None:
        os.close(tests_fd)  # never read here: the runner reads it
    if "pidns" not in namespaces:
        _set_own_group(session)  # also done by the session: whichever runs first
    _, timed_out = _wait_until(session, config["timeout_s"])
    wall_s = time.monotonic() - started
    if "pidns" not in namespaces:
        _kill_leftovers(session, config["uid"])
    _reap_orphans()
    # The session's mounts line, then the program's wait status (missing when the session was
    # killed at the deadline). Everything of the run is dead by now: nothing can write more.
    mounts, _, reported = _read_available(status_read).decode().partition("\n")
    wait_status = int(reported) if reported else None
    returncode = -signal.SIGKILL if wait_status is None else os.waitstatus_to_exitcode(wait_status)
    isolation = [name for name in namespaces if name != "mntns"]  # the session says what applied
    isolation += json.loads(mounts) if mounts else []
    isolation += ["rlimits", "no_new_privs"]
    if config["uid"] is not None:
        isolation.append(f"uid={config['uid']}")
    report = {"returncode": returncode, "timed_out": timed_out, "wall_s": wall_s,
              "isolation": isolation}  # fmt: skip
    if harness is not None:
        report["verdicts"] = _read_available(verdicts_read).decode("ascii", errors="replace")
    _write_all(report_fd, json.dumps(report).encode())
    os.close(report_fd)
    os._exit(returncode if returncode >= 0 else 128 - returncode)


def _read_file(fd: int) -> bytes:
    """All of an inherited file, from its start (the trainer wrote it through the same offset)."""
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _load_harness() -> types.ModuleType:
    """`code_harness`, loaded by path: jaxpt is not importable here (the interpreter may differ)."""
    harness = types.ModuleType("code_harness")
    harness.__file__ = _HARNESS
    with open(_HARNESS, encoding="utf-8") as f:
        exec(compile(f.read(), _HARNESS, "exec"), harness.__dict__)  # noqa: S102 -- our file
    return harness


def _unshare_namespaces(libc, as_root: bool) -> list[str]:
    """Enter new network, PID and mount namespaces, as many as this machine allows.

    "mntns" is only tried with a PID namespace (its point is a /proc of the run's processes
    only) and, in a user namespace, once our own ids are mapped (files on a tmpfs of the
    namespace need a mapped owner).
    """
    attempts = [
        (_CLONE_NEWNET | _CLONE_NEWPID, ["netns", "pidns"]),
        (_CLONE_NEWNET, ["netns"]),
        (_CLONE_NEWPID, ["pidns"]),
    ]
    if not as_root:
        # An unprivileged user may own namespaces inside a user namespace of its own. Not for
        # root: the program could not switch to the throwaway uid inside one.
        attempts = [(_CLONE_NEWUSER | flags, ["userns", *names]) for flags, names in attempts]
    uid, gid = os.getuid(), os.getgid()  # before a user namespace hides them
    for flags, names in attempts:
        if libc is not None and libc.unshare(flags) == 0:
            break
    else:
        return []
    if "userns" in names and not _map_own_ids(uid, gid):
        return names
    if "pidns" in names and libc.unshare(_CLONE_NEWNS) == 0:
        names.append("mntns")
    return names


def _map_own_ids(uid: int, gid: int) -> bool:
    """Map our uid and gid to themselves in the new user namespace (unmapped, they show as 65534)."""
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):  # fmt: skip
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        return False
    return True


def _private_mounts(libc, hide: list[str], tmpfs_bytes: int) -> list[str]:
    """In the run's mount namespace: a fresh /proc, and `hide` under empty tmpfs mounts.

    Called by the session, PID 1 of the run's PID namespace, before it forks anything. The
    scratch dir (cwd) and the interpreter's own paths are bound back where they were. Returns
    the isolation entries that applied; a directory whose paths could not be bound back is
    left visible rather than breaking the program.
    """
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                      ctypes.c_char_p]  # fmt: skip
    # Mounts made here must never propagate out (a root trainer's mounts are often shared).
    if mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return []
    applied = ["mntns"]
    cwd = os.getcwd()
    needed = [cwd, os.path.dirname(_HARNESS), sys.prefix, sys.base_prefix, sys.exec_prefix,
              sys.base_exec_prefix, *sys.path]  # fmt: skip
    held = {}  # needed path -> O_PATH descriptor, opened before anything covers it
    for path in sorted({os.path.realpath(path) for path in needed if path}):
        if not any(_within(path, outer) for outer in held):
            try:
                held[path] = os.open(path, os.O_PATH)
            except OSError:
                pass  # missing (e.g. pythonXY.zip) or unreachable: the program cannot use it either
    targets = []  # outermost first; none inside a needed path (hiding it could break Python)
    for path in sorted({os.path.realpath(path) for path in hide}):
        if path == "/" or not os.path.isdir(path):
            continue
        if any(_within(path, outer) for outer in [*targets, *held]):
            continue
        targets.append(path)
    if mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None) == 0:
        applied.append("procfs")
    options = f"mode=1777,size={tmpfs_bytes},nr_inodes={_TMPFS_INODES}".encode()
    old_umask = os.umask(0o022)
    try:
        for target in targets:
            if mount(b"tmpfs", target.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options) != 0:
                continue
            try:
                for path, fd in held.items():
                    if _within(path, target):
                        _bind_back(mount, fd, path)
            except OSError:
                libc.umount2(target.encode(), _MNT_DETACH)
                continue
            applied.append(f"hide={target}")
    finally:
        os.umask(old_umask)
        for fd in held.values():
            os.close(fd)
    os.chdir(cwd)  # through the bind mount, if the scratch dir was under a hidden directory
    return applied


def _bind_back(mount, fd: int, path: str) -> None:
    """Bind what `fd` (O_PATH) names onto `path`, inside a fresh tmpfs."""
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
    if mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, _MS_BIND | _MS_REC, None):
        raise OSError(ctypes.get_errno(), f"could not bind {path}")


def _within(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


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


def _session(config, source, libc, harness, namespaces, status_write, verdicts_write) -> None:
    """Start the runner (with tests) and the program, reap, report the program's status, exit."""
    _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)  # supervisor killed: end the run
    _prctl(libc, _PR_SET_DUMPABLE, 0)  # inherited already; the program is forked from here
    if "pidns" not in namespaces:
        _set_own_group(0)  # the program and its children stay in it: killable as one
    mounts = []
    if "mntns" in namespaces:
        mounts = _private_mounts(libc, config["hide"], config["limits"]["RLIMIT_FSIZE"][1])
    os.write(status_write, json.dumps(mounts).encode() + b"\n")
    tests_fd = config["tests_fd"]
    runner, program_fds = None, ()
    if harness is not None:
        calls_read, calls_write = os.pipe()
        replies_read, replies_write = os.pipe()
        runner = os.fork()
        if runner == 0:
            _close_fds_except({0, 1, 2, calls_write, replies_read, verdicts_write, tests_fd})
            _runner(config, libc, harness, calls_write, replies_read, verdicts_write)
        os.close(calls_write)
        os.close(replies_read)
        os.close(tests_fd)
        program_fds = (calls_read, replies_write)
    os.close(verdicts_write)  # before the program is forked: it must never hold this pipe
    program = os.fork()
    if program == 0:
        _close_fds_except({0, 1, 2, *program_fds})
        _program(config, source, libc, harness, program_fds)
    for fd in program_fds:
        os.close(fd)
    status = _reap_children(program, runner)
    if status is not None:
        os.write(status_write, str(status).encode())
    os._exit(0)  # as PID 1: the kernel kills and reaps whatever is left in the namespace


def _reap_children(program: int, runner: int | None) -> int | None:
    """Reap (orphans too, as PID 1) until the program and the runner are done.

    Returns the program's wait status, or None when it is still running `_PROGRAM_GRACE_S`
    after the runner finished (its verdicts are final by then; the program is killed).
    """
    program_status, runner_done, deadline = None, runner is None, None
    while program_status is None or not runner_done:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == program:
            program_status = status
        elif pid == runner:
            runner_done, deadline = True, time.monotonic() + _PROGRAM_GRACE_S
        if pid:
            continue
        remaining = 3600.0 if deadline is None else deadline - time.monotonic()
        if remaining <= 0:
            break
        signal.sigtimedwait({signal.SIGCHLD}, remaining)
    return program_status


def _kill_leftovers(session: int, uid: int | None) -> None:
    try:
        os.killpg(session, signal.SIGKILL)  # the session leads the run's process group
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


def _read_available(fd: int) -> bytes:
    """What the pipe holds, without waiting for writers (all are dead by now, or never wrote)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _runner(config, libc, harness, calls_out: int, replies_in: int, verdicts_out: int) -> None:
    """Run the tests against the program and report verdicts; never returns."""
    try:
        # Read here, not in the supervisor: the program's memory is a copy of the session's.
        tests = json.loads(_read_file(config["tests_fd"]))
        os.close(config["tests_fd"])
        statements = [(bool(is_test), str(source)) for is_test, source in tests]
        _confine(config, libc)
        if _prctl(libc, _PR_SET_DUMPABLE, 0) != 0:  # a uid change resets it
            raise OSError("prctl(PR_SET_DUMPABLE) failed")
        # The program (same uid) may signal us: one that would raise inside Python is ignored;
        # the others can only kill or stop the runner, which fails the remaining tests.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except Exception as exc:  # noqa: BLE001
        print(f"sandbox setup failed: {exc!r}", file=sys.stderr, flush=True)
        os._exit(_EXIT_SETUP_FAILED)
    try:
        harness.run_tests(statements, calls_out, replies_in, verdicts_out)
        code = 0
    except BaseException:  # noqa: BLE001 -- e.g. the supervisor is gone
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _program(config, source, libc, harness, program_fds) -> None:
    try:
        _confine(config, libc)
        _block_sockets()
    except Exception as exc:  # noqa: BLE001
        # Fail closed: never run untrusted code with more rights than asked for.
        print(f"sandbox setup failed: {exc!r}", file=sys.stderr, flush=True)
        os._exit(_EXIT_SETUP_FAILED)
    _run_program(source, harness, program_fds)


def _confine(config, libc) -> None:
    """Limits, no_new_privs, the sandbox uid, no capabilities: raises if any of them fails."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    _set_limits(config["limits"])
    if _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")  # setuid binaries stay inert
    if config["uid"] is not None:
        _drop_privileges(config["uid"])
    _drop_capabilities(libc)
    _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which resets it
    os.umask(0o077)


def _run_program(source: str, harness, program_fds) -> None:
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
        if harness is not None:
            harness.serve(main_module.__dict__, *program_fds)
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


def _drop_capabilities(libc) -> None:
    """Empty effective, permitted and inheritable sets (capset(2)).

    A uid change away from root already clears them; in a user namespace the process would
    otherwise hold every capability there, CAP_SYS_PTRACE over its siblings included.
    """

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]

    if libc is None or libc.capset(ctypes.byref(Header(_CAPABILITY_VERSION_3, 0)), (Data * 2)()):
        raise OSError("capset failed")


def _set_own_group(pid: int) -> None:
    try:
        os.setpgid(pid, pid)  # 0: the calling process
    except OSError:
        pass  # already done from the other side, or the process is gone


def _close_fds_except(keep: set[int]) -> None:
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        open_fds = range(os.sysconf("SC_OPEN_MAX"))
    for fd in open_fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # e.g. the listdir's own descriptor, already closed


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
