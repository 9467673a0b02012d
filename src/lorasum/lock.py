"""One run per folder: an exclusive lock that a second run is refused by (naming the holder) and that a killed run
cannot leave held.

The lock is `fcntl.flock` on `FOLDER/.lorasum.lock`: the kernel releases it when the holder's process ends however
it ends, so a lock left by a killed process is free and is simply taken over. The file's text names the holder
(pid, host, start time, command) for the refusal message; a clean release empties it, so a non-empty file whose lock
is free is the trace of a killed run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Iterator

from .errors import LorasumError

LOCK_FILE = ".lorasum.lock"


def _holder(fd: int) -> dict:
    """What the lock file says of its holder ({} when empty or unreadable)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8")
        info = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    when = info.get("started")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {started}"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run folder", key: str | None = "out") -> Iterator[dict]:
    """Hold `folder`'s lock for the block; yields the stale holder's record when a killed run's lock was taken over
    ({} otherwise). A live holder is a LorasumError naming its pid."""
    folder = Path(folder)
    path = folder / LOCK_FILE
    try:  # never through a symlink: truncating the lock would empty whatever it points to
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LorasumError(f"{path} is a symbolic link, which lorasum never makes; remove it or choose another "
                               f"{what}", key=key) from None
        raise LorasumError(f"cannot lock {what} {folder}: {e.strerror}; choose a folder you can write to",
                           key=key) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LorasumError(f"{path} is not a plain file; remove it or choose another {what}", key=key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LorasumError(f"{folder} is in use by another lorasum run ({_describe(_holder(fd))}); wait for it "
                               f"to finish, stop it, or choose another {what}", key=key) from None
        stale = _holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3),
              "command": " ".join(sys.argv[:1] + sys.argv[1:3])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        os.fsync(fd)
        try:
            yield stale
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
