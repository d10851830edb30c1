"""One writer per output: a run holds an exclusive lock on each file it writes until it ends.

Two runs started on one output would otherwise both truncate it (the second sees the first's live file as
"an earlier result"). :class:`OutputLock` takes ``flock(LOCK_EX | LOCK_NB)`` on a hidden file beside the
output, ``.<name>.lock``, holding ``pid@host`` of the holder. The kernel drops the lock when the process
ends, however it ends (SIGKILL included), so a stale lock file never blocks a later run. On a file system
without ``flock`` (some Lustre mounts) the lock is skipped with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from ..errors import InputError

log = logging.getLogger(__name__)


def lock_path(path) -> Path:
    """``<folder>/.<name>.lock`` for ``<folder>/<name>``."""
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


class OutputLock:
    """An exclusive lock on ``path`` for this process (see the module docstring).

    Args:
        path: the output file.
        what: the key or option that named it, for the message (``output``, ``--out``).
    Raises:
        InputError: another process holds the lock (the message names its ``pid@host``).
    """

    def __init__(self, path, what: str = "output"):
        self.path, self.what = Path(path), what
        self.lock_file = lock_path(self.path)
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # the holder may unlink the file just after we opened it: open again
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise InputError(
                        f"{self.what}: {str(self.path)!r} is being written by another gpusmall run "
                        f"({holder or 'unknown process'}); wait for it to end or choose another "
                        f"output"
                    ) from None
                log.warning(
                    "%s: cannot lock %s (%s): a second run on this output would not be stopped",
                    self.what,
                    self.lock_file,
                    exc.strerror,
                )
                return self
            if _same_file(fd, self.lock_file):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()}@{socket.gethostname()}\n".encode())
                self.fd = fd
                return self
            os.close(fd)
        raise InputError(f"{self.what}: could not lock {str(self.path)!r}: its lock file keeps changing")

    def release(self) -> None:
        """Unlink the lock file and drop the lock (the unlink first: whoever opens it next gets a new one)."""
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.lock_file):
                self.lock_file.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode(errors="replace").strip()
    except OSError:
        return ""
