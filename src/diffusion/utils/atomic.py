"""Atomic file writes: a temporary file in the target's folder, flushed, fsynced, renamed.

A crash or a full disk during the write leaves the previous file intact (os.replace is
atomic on POSIX within one filesystem) and no partial file under the final name. A process
killed during the write (kill -9) leaves its temporary, ``.<name>.<random>.tmp``, behind;
`remove_stale_temporaries` clears those where no other writer can be at work.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

import numpy as np

TMP_SUFFIX = ".tmp"


def _tmp_prefix(name: str) -> str:
    return f".{name}."


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back, once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_tmp_prefix(os.path.basename(path)), suffix=TMP_SUFFIX)
    try:
        # mkstemp creates the file 0600; the result gets the mode open() would give it.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_savez(path: str, **arrays: np.ndarray) -> None:
    """np.savez to ``path`` atomically (``path`` should end in .npz)."""
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)


def atomic_save_json(path: str, obj: Any) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")


def remove_stale_temporaries(folder: str, names: Iterable[str] | None = None) -> list[str]:
    """Remove the temporaries that killed `atomic_write` calls left in ``folder``: those of
    the files ``names`` (base names), or all of them. Safe only while no other process
    writes there (hold ``diffusion.utils.lock.folder_lock``). Returns the paths removed."""
    if not os.path.isdir(folder):
        return []
    prefixes = None if names is None else tuple(_tmp_prefix(name) for name in names)
    removed = []
    for entry in os.listdir(folder):
        if entry.startswith(".") and entry.endswith(TMP_SUFFIX) and (
                prefixes is None or entry.startswith(prefixes)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, entry))
                removed.append(os.path.join(folder, entry))
    return removed
