"""One-line errors for bad input at the entry points, instead of a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from diffusion.training.checkpoint import CheckpointError

# Errors that describe bad input (a path, a name, a number) and whose message says it all.
USER_ERRORS = (CheckpointError, ValueError, FileNotFoundError)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Print ``error: <message>`` on one line and exit with status 2 on bad input."""
    try:
        yield
    except USER_ERRORS as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
