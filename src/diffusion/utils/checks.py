"""Argument checks shared by the callbacks, the training helpers and the jobs.

Each raises a ValueError whose message names the setting and the value and says what is
expected, so that an entry point can print it as it is (``error: <message>``); inside
``diffusion.utils.errors.config_errors(group)`` it becomes a ConfigError naming the group.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import Any

from diffusion.utils.errors import UserError


class UnwritableError(UserError, OSError):
    """A folder or file that cannot be written: read-only, full, or under a regular file
    (an OSError, and a `UserError`: the entry points print its message, not a traceback)."""


def require_int(label: str, value: Any, minimum: int) -> None:
    """Raise ``ValueError("<label>=<value> must be an integer >= <minimum>")`` unless ``value``
    is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{label}={value!r} must be an integer >= {minimum}")


def require_choice(label: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError("<label>=<value> is not one of <choices>")`` unless ``value`` is one."""
    choices = list(choices)
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{label}={value!r} is not one of {', '.join(map(str, choices))}")


def require_bool(label: str, value: Any) -> None:
    """Raise ``ValueError("<label>=<value> must be true or false")`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{label}={value!r} must be true or false")


def require_writable_dir(label: str, path: str | os.PathLike) -> str:
    """Create the folder ``path`` if needed and prove that a file can be written in it;
    return it (``~`` expanded). Raises `UnwritableError` naming ``label`` and the reason.
    (Write access is tried, not read from the mode bits, which root ignores.)"""
    folder = os.path.expanduser(os.fspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UnwritableError(
            f"{label}={folder} is not a writable folder ({reason}); choose a folder that can be written"
        ) from None
    return folder
