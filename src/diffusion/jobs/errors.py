"""The one error path of the entry points: user errors as one line, bugs as tracebacks.

An error caused by the user's config, data, files or environment ends the program with

    error: <what is wrong, naming the key, value or file> <how to fix it>

on stderr and exit status 2. Those are (`user_error`): `diffusion.utils.errors.UserError`
(``ConfigError`` for a config key outside its domain), `CheckpointError`, Hydra's own
composition errors (an unknown ``experiment=``, a key not in the config), an OSError about
the environment (a full disk, a missing file, no permission), and what Hydra's
``instantiate`` raised for one of them. Everything else is a bug and keeps its traceback;
``HYDRA_FULL_ERROR=1`` (Hydra's convention) shows the traceback of user errors too.

An entry point runs its ``@hydra.main`` function through `run_entry_point` (or nests
`exit_on_user_error` outside `raise_hydra_errors` itself), so that Hydra's errors reach it
instead of being printed by Hydra.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

from diffusion.checkpoint import CheckpointError
from diffusion.utils.errors import UserError, environment_error, instantiation_cause

# Errors that describe bad input and whose message says it all.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, CheckpointError, ConfigCompositionException, MissingConfigException, OverrideParseException,
)
EXIT_USER_ERROR = 2
# Set beside HYDRA_FULL_ERROR by `raise_hydra_errors`: Hydra raises, but the user did not ask
# for tracebacks (inherited by DDP's child processes, which read it the same way).
_SET_BY_US = "DIFFUSION_HYDRA_RAISES"
_ENVIRONMENT_HINTS = {
    errno.ENOSPC: "the disk is full: free space there, or write elsewhere (train.py: hydra.run.dir=...)",
    errno.EDQUOT: "the disk quota is used up: free space, or write elsewhere (train.py: hydra.run.dir=...)",
    errno.EROFS: "the file system is read-only: write elsewhere (train.py: hydra.run.dir=...)",
    errno.EACCES: "permission denied: fix the permissions, or use another path",
    errno.EPERM: "operation not permitted: fix the permissions, or use another path",
}


def one_line(message: str) -> str:
    return " ".join(message.split())


def user_error(err: BaseException, also: tuple[type[BaseException], ...] = ()) -> str | None:
    """The one-line message of ``err`` if it is the user's to fix, else None (a bug)."""
    cause = instantiation_cause(err)
    if isinstance(cause, (*USER_ERRORS, *also)):
        return one_line(str(cause))
    env = environment_error(cause)
    if env is None:
        return None
    message = one_line(str(cause) if cause is not env and str(cause) else _describe_os_error(env))
    hint = _ENVIRONMENT_HINTS.get(env.errno)
    if hint and env.strerror and env.strerror not in message:
        hint = f"{env.strerror}; {hint}"
    return f"{message} ({hint})" if hint else message


def _describe_os_error(err: OSError) -> str:
    filename = err.filename if err.filename is not None else file_in_traceback(err)
    if filename is not None and err.strerror:
        return f"{err.strerror}: {filename}"
    return str(err) or type(err).__name__


def file_in_traceback(err: BaseException) -> str | None:
    """The file that was being written when ``err`` was raised (a write to an open file
    raises an OSError without its name): the innermost open file among the frames' locals."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name = getattr(value, "path", None) or getattr(value, "name", None)
            if callable(getattr(value, "write", None)) and isinstance(name, str) and os.sep in name:
                return name
    return None


def full_traceback_wanted() -> bool:
    """The user set HYDRA_FULL_ERROR=1 (not `raise_hydra_errors` on their behalf)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_SET_BY_US) != "1"


@contextlib.contextmanager
def exit_on_error(errors: tuple[type[BaseException], ...], status: int) -> Iterator[None]:
    """Print ``error: <message>`` on one line and exit with ``status`` on one of ``errors``."""
    try:
        yield
    except errors as err:
        if full_traceback_wanted():
            raise
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(status)


@contextlib.contextmanager
def exit_on_user_error(*also: type[BaseException]) -> Iterator[None]:
    """Exit with status 2 and ``error: <message>`` on a user error (`user_error`); ``also``
    adds exception types that count as user errors at this entry point (e.g. ValueError
    where every ValueError is an input check). Bugs propagate with their traceback."""
    try:
        yield
    except Exception as err:
        message = user_error(err, also)
        if message is None or full_traceback_wanted():
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def raise_hydra_errors() -> Iterator[None]:
    """Inside, Hydra raises its errors (and the job's) instead of printing them itself, so
    that `exit_on_user_error` decides how they are shown."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = os.environ[_SET_BY_US] = "1"
    try:
        yield
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        os.environ.pop(_SET_BY_US, None)


def run_entry_point(hydra_main: Callable[[], Any], *also: type[BaseException]) -> None:
    """Run a ``@hydra.main`` function with the one error path (see the module doc)."""
    with exit_on_user_error(*also), raise_hydra_errors():
        hydra_main()
