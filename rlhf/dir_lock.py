"""An exclusive lock on a run's output directory: ``output_dir/run.lock``.

One training run writes a directory at a time. The lock is an ``flock`` on ``run.lock``, which the kernel
releases when its process ends however it ends, and the file says who holds it (pid, host, start time,
command) so that a second run fails at once naming the holder. A lock file left behind by a process that
is gone (SIGKILL, a power cut) is stale: the next run on the same host takes it over with a warning. A
lock file written on another host cannot be checked from here: the error says how to clear it.

Within one process the lock is re-entrant (two trainers built in one script share it); it is released
when the last holder releases it, or when the process exits.
"""

import atexit
import fcntl
import json
import logging
import os
import socket
import sys
import time

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class DirectoryLocked(RuntimeError):
    """Another live run holds the output directory."""


_HELD: dict[str, list] = {}  # lock path -> [fd, holders, owner pid], this process's locks


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), which tells a live process from a later one reusing its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    recorded, now = holder.get("pid_start"), _start_time(pid)
    return recorded is None or now is None or recorded == now


def describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {when}, "
            f"command: {holder.get('command') or '?'}")


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"unreadable": raw[:200].decode("utf-8", "replace")}
    return holder if isinstance(holder, dict) else {"unreadable": str(holder)[:200]}


def _refusal(path: str, holder: dict, hint: str) -> DirectoryLocked:
    return DirectoryLocked(
        f"output_dir {os.path.dirname(path)} is in use by another run ({describe(holder)}); {hint} Two runs writing "
        "one directory would interleave metrics.jsonl and overwrite each other's checkpoints and model: wait for "
        "that run to end, or give this one another output_dir.")


class DirectoryLock:
    """This process's hold on ``output_dir/run.lock``; ``release()`` gives it up (idempotent)."""

    def __init__(self, path: str):
        self.path = path
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        entry = _HELD.get(self.path)
        if entry is None or entry[2] != os.getpid():  # a forked child never releases its parent's lock
            return
        entry[1] -= 1
        if entry[1] == 0:
            _unlock(self.path)


def _unlock(path: str) -> None:
    fd, _, _ = _HELD.pop(path)
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)  # while still holding the flock: a waiter that opened this file sees it is gone
    except OSError:
        pass
    os.close(fd)


@atexit.register
def _release_all() -> None:
    for path, entry in list(_HELD.items()):
        if entry[2] == os.getpid():
            _unlock(path)


def acquire(output_dir: str) -> DirectoryLock:
    """Lock ``output_dir`` (which must exist) for this process, or raise ``DirectoryLocked`` naming the holder."""
    path = os.path.abspath(os.path.join(output_dir, LOCK_FILE))
    if path in _HELD and _HELD[path][2] == os.getpid():
        _HELD[path][1] += 1
        return DirectoryLock(path)
    host = socket.gethostname()
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise _refusal(path, holder, "it holds the lock now.") from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if not current:  # the holder released and removed the file between our open and our lock: retry
            os.close(fd)
            continue
        previous = _read(fd)
        if previous and previous.get("host") != host and "unreadable" not in previous:
            os.close(fd)
            raise _refusal(path, previous, f"this host ({host!r}) cannot tell whether it is still running. If it "
                                           f"is not, delete {path}.")
        if previous and previous.get("pid") != os.getpid() and _alive(previous):
            os.close(fd)  # a file system without working flock: trust the pid
            raise _refusal(path, previous, f"that process is alive. If it is not that run, delete {path}.")
        if previous:
            logger.warning("Taking over the stale lock %s left by a run that is no longer running (%s).", path,
                           describe(previous) if "unreadable" not in previous else previous["unreadable"])
        holder = {"pid": os.getpid(), "pid_start": _start_time(os.getpid()), "host": host, "started": time.time(),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
        os.fsync(fd)
        _HELD[path] = [fd, 1, os.getpid()]
        return DirectoryLock(path)
    raise DirectoryLocked(f"could not lock {path}: it kept being replaced by other processes; retry.")
