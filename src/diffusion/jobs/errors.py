"""One-line errors for bad input at the entry points, instead of a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from diffusion.checkpoint import CheckpointError

# Errors that describe bad input (a path, a name, a number) and whose message says it all.
USER_ERRORS = (CheckpointError, ValueError, FileNotFoundError)


@contextlib.contextmanager
def exit_on_error(errors: tuple[type[BaseException], ...], status: int) -> Iterator[None]:
    """Print ``error: <message>`` on one line and exit with ``status`` on one of ``errors``."""
    try:
        yield
    except errors as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(status)


def exit_on_user_error() -> contextlib.AbstractContextManager[None]:
    """Exit with status 2 on bad input (`USER_ERRORS`)."""
    return exit_on_error(USER_ERRORS, 2)
