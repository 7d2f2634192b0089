"""Child side of the code sandbox: confine this process, then run the untrusted program in it.

`jaxpt.rewards.sandbox` starts this file as `python -I sandbox_launcher.py CONFIG_JSON` in a fresh
process group, with the scratch directory as cwd. It uses only the standard library and never
imports jaxpt: it runs under whichever interpreter the sandbox was given, and the part after
`_drop_privileges` runs with the rights of the untrusted program.

Order matters: everything that needs root (the network namespace, hard resource limits) happens
before the privilege drop, and the program's source is read while its file is still readable.
"""

import builtins
import ctypes
import errno
import json
import os
import resource
import signal
import sys
import types

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_EXIT_SETUP_FAILED = 125


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _isolate_network(libc) -> str:
    """Move into an empty network namespace (only a downed loopback): no connection can leave."""
    if libc is None:
        return "none"
    if libc.unshare(_CLONE_NEWNET) == 0:
        return "netns"
    # Unprivileged users may still own a namespace when they first create a user namespace.
    if os.geteuid() != 0 and libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        return "userns+netns"
    return "none"


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


def _run_program(source: str) -> None:
    main = types.ModuleType("__main__")
    main.__file__ = "solution.py"
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = ["solution.py"]
    exec(compile(source, "solution.py", "exec"), main.__dict__)


def main() -> None:
    config = json.loads(sys.argv[1])
    with open(config["program"], encoding="utf-8") as f:
        source = f.read()
    libc = _libc()
    isolation = [_isolate_network(libc)]
    try:
        _set_limits(config["limits"])
        isolation.append("rlimits")
        if libc is not None and libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
            isolation.append("no_new_privs")  # setuid binaries cannot give privileges back
        if config["uid"] is not None:
            isolation.append(f"uid={config['uid']}")
        with open(config["report"], "w") as f:  # written while the report is still writable
            json.dump(isolation, f)
        if config["uid"] is not None:
            _drop_privileges(config["uid"])
    except Exception as exc:
        # Fail closed: never run untrusted code with more rights than asked for.
        print(f"sandbox setup failed: {exc!r}", file=sys.stderr)
        os._exit(_EXIT_SETUP_FAILED)
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the trainer
    os.umask(0o077)
    _block_sockets()
    del config, libc
    _run_program(source)


if __name__ == "__main__":
    main()
