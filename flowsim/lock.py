"""One writer per output: an exclusive lock on ``<out>.lock`` for as long as a run or a sweep
writes there.

A second process asking for the same output gets a `RecordError` naming the holder (its pid and
command), before it touches anything. The lock is ``fcntl.flock`` on the lock file, so the
kernel releases it when its holder dies, however it dies (SIGKILL included); a stale lock file
left by a killed holder is taken over. The file is removed when the lock is released.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import RecordError


def lock_path(out: str | os.PathLike) -> Path:
    """Where the lock of the output `out` lives: ``<out>.lock`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, field: str = "run.out") -> Iterator[None]:
    """Hold the lock of `out` inside the block; raise RecordError (naming `field`) if another
    process holds it."""
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RecordError(f"{field}: cannot create the lock {str(path)!r} ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RecordError(
                    f"{field}: {str(out)!r} is being written by {holder}; wait for it to end, or choose another output"
                ) from None
            raise RecordError(f"{field}: cannot lock {str(path)!r} ({exc.strerror})") from exc
        # the holder before us may have removed the file between our open and our lock: then we
        # hold a lock on a name that no longer exists, and must take the file that does
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
