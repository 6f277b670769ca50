"""An exclusive lock on an output folder, so that two jobs never write into one at once.

``with folder_lock(folder):`` holds ``fcntl.flock`` on ``<folder>/.lock`` and refuses at
once, without waiting, when another process holds it: `FolderBusyError` names the folder
and the holder's pid, which the holder writes into the file. The kernel drops a flock when
its holder dies, however it dies (kill -9 and out-of-memory kills included), so a lock
file left by a killed job never blocks the next one, which simply takes it over; a clean
exit removes the file. Within one process the lock is re-entrant (the evaluate job holds
it while the sample job it calls takes it again).

Removing the file while others may be opening it is safe because a new holder checks,
after locking, that the path still names the inode it locked, and starts over if not.
(filelock, which torch installs, truncates the file on open, erasing the holder's pid.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from diffusion.utils.errors import UserError

LOCK_NAME = ".lock"

_held: dict[str, int] = {}  # lock file -> how many nested with-blocks of this process hold it


class FolderBusyError(UserError):
    """Another process holds a folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, label: str = "output_dir") -> Iterator[str]:
    """Hold the lock of ``folder`` (which must exist) for the with-block; yields the lock
    file's path. ``label`` is the setting that chose the folder, named in the error."""
    path = os.path.join(os.path.realpath(os.path.expanduser(folder)), LOCK_NAME)
    if path in _held:
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    fd = _acquire(path, os.fspath(folder), label)
    _held[path] = 1
    try:
        yield path
    finally:
        del _held[path]
        with contextlib.suppress(OSError):
            os.remove(path)  # while still held: a process that opened it re-checks the inode
        os.close(fd)  # releases the lock


def _acquire(path: str, folder: str, label: str) -> int:
    """Open, lock and stamp ``path`` with this pid; FolderBusyError if another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderBusyError(
                f"{folder} is being written by another process (pid {holder}); wait for it "
                f"to finish, or pass another {label}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if _names_inode(path, fd):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the holder removed the file between our open and our lock: again


def _names_inode(path: str, fd: int) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
