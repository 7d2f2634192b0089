"""Throwaway user ids for sandboxed programs (used only when the trainer runs as root).

Each run gets a uid no one else is using. That makes the run's leftovers easy to find: every
process and every temp file with that uid belongs to it, even a process that left the process
group with `setsid`. It also keeps RLIMIT_NPROC, which counts processes per user, meaningful.
"""

import contextlib
import fcntl
import functools
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator

# No login account uses these; below 65536 so that user-namespaced containers can map them.
SANDBOX_UIDS = range(64200, 64328)

# Directories any user may write to: the only places a sandboxed program can leave files.
_SHARED_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_KILL_ALL_OF_MY_UID = (
    "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n    pass"
)


@contextlib.contextmanager
def lease_uid() -> Iterator[int]:
    """Hold an unused sandbox uid for the length of a run, exclusive across threads and processes."""
    lock_dir = _lock_dir()
    for uid in SANDBOX_UIDS:
        if _has_account(uid):
            continue
        lock_fd = os.open(os.path.join(lock_dir, str(uid)), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            continue
        if live_processes(uid):  # a run that could not clean up: leave this uid alone
            os.close(lock_fd)
            continue
        try:
            yield uid
        finally:
            os.close(lock_fd)  # closing releases the lock
        return
    raise RuntimeError(f"all {len(SANDBOX_UIDS)} sandbox uids are busy")


def live_processes(uid: int) -> list[int]:
    """Pids of the processes owned by `uid` that have not exited (zombies excluded)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # exited while we looked
        if state not in (b"Z", b"X"):
            pids.append(int(name))
    return pids


def kill_all(uid: int, python: str, attempts: int = 5) -> bool:
    """SIGKILL every process of `uid`; True once none is left.

    A helper running as `uid` calls kill(-1): the kernel then signals exactly that user's
    processes, atomically, with no risk of hitting a recycled pid.
    """
    for _ in range(attempts):
        if not live_processes(uid):
            return True
        subprocess.run(
            [python, "-I", "-S", "-c", _KILL_ALL_OF_MY_UID],
            check=False,
            user=uid,
            group=uid,
            extra_groups=[],
            env={},
            cwd="/",
            close_fds=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
        )
        time.sleep(0.01)  # SIGKILL is delivered asynchronously
    return not live_processes(uid)


def remove_files(uid: int) -> None:
    """Delete what `uid` left at the top of the shared temp directories."""
    for directory in {*_SHARED_WRITABLE_DIRS, tempfile.gettempdir()}:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
                if info.st_uid != uid:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


@functools.cache
def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _lock_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), "jaxpt-sandbox-uids")
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    # Someone else's directory could let a sandboxed program delete our locks.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{path} must be a directory owned by uid {os.geteuid()}, mode 0700")
    return path
