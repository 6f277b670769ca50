"""Argument checks shared by the callbacks and training helpers."""

from __future__ import annotations

from typing import Any


def require_int(label: str, value: Any, minimum: int) -> None:
    """Raise ``ValueError("<label>=<value> must be an integer >= <minimum>")`` unless ``value``
    is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{label}={value!r} must be an integer >= {minimum}")
