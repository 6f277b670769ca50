"""Errors that the user can fix: a config value, a file, the disk. Not bugs.

The entry points (`diffusion.jobs.errors.exit_on_user_error`) print these as one line,
``error: <what is wrong> <how to fix it>``, and exit with status 2; anything else keeps its
traceback. Code that checks the user's input raises `ConfigError` (a config key outside its
domain; the message starts with the key, ``module.optimizer.lr=-1 must be ...``) or another
`UserError`; `config_errors` turns what a constructor raises while it is built from a config
group into a `ConfigError` naming the group.
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Iterator

# Python's own message when a call's keywords do not fit the signature.
_BINDING_ERROR = re.compile(r"\(\) (got an unexpected keyword argument|missing \d+ required .*argument)")
# The OS telling the user about their environment (a full disk, a read-only folder, a
# missing file), not the program about a bug.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EMFILE, errno.EFBIG})
# A message that starts by naming a key: ``lr=-1 ...`` or ``decays=[1.5] ...``.
_LEADING_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# One that starts with a full dotted key (``module.nonfinite.policy=...``): it is named already.
_LEADING_DOTTED_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+=")


class UserError(Exception):
    """Wrong input from the user (config, data, files, environment); the message says what
    is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config value outside its domain; the message names the key (``model.num_res_blocks=0 ...``)."""


def environment_error(err: BaseException) -> OSError | None:
    """The OSError about the user's environment (full disk, permissions, missing path) that
    ``err`` is, or that a chain of I/O errors (OSError, or the RuntimeError torch.save makes
    of one) leads to; else None. Another kind of error in the chain is a bug: not followed."""
    seen: set[int] = set()
    while isinstance(err, (OSError, RuntimeError)) and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)):
            return err
        if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def name_key(group: str, message: str) -> str:
    """``message`` with the config ``group`` named: ``lr=-1 ...`` -> ``module.optimizer.lr=-1 ...``;
    a message that starts with a full dotted key, or names a key of the group, stays as it
    is; any other gets ``<group>: `` in front."""
    if _LEADING_KEY.match(message):
        return f"{group}.{message}"
    if _LEADING_DOTTED_KEY.match(message) or f"{group}." in message or f"{group}=" in message:
        return message
    return f"{group}: {message}"


def raised_by_project(err: BaseException) -> bool:
    """True if the ``raise`` that threw ``err`` is in this package's code (a deliberate check),
    not in a library the package called."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "").startswith("diffusion.")


@contextlib.contextmanager
def config_errors(group: str, *kinds: type[BaseException],
                  library: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Inside, what this package's own checks raise (``kinds``: ValueError by default) while
    an object is built from config ``group`` becomes a `ConfigError` naming the group, and so
    do a keyword the constructor does not take, a ``_target_`` that does not exist, and a
    library's own configuration errors (``library``, e.g. Lightning's MisconfigurationException).
    Anything else raised inside a library stays what it is: a bug until shown otherwise."""
    kinds = kinds or (ValueError,)
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        cause = instantiation_cause(err)
        if isinstance(cause, UserError):
            raise cause from None
        ours = isinstance(cause, kinds) and raised_by_project(cause)
        if not (ours or isinstance(cause, library) or _bad_target_or_keyword(err, cause)):
            raise
        message = " ".join(str(cause).split())
        raise ConfigError(name_key(group, message)) from cause


def instantiation_cause(err: BaseException) -> BaseException:
    """What a constructor raised, when ``err`` is Hydra's `InstantiationException` around it."""
    while type(err).__name__ == "InstantiationException" and err.__cause__ is not None:
        err = err.__cause__
    return err


def _bad_target_or_keyword(err: BaseException, cause: BaseException) -> bool:
    """Hydra could not find a ``_target_`` (ImportError), or Python could not bind the
    config's keys to the constructor's arguments (its own TypeError, raised before the
    constructor ran: an unknown key, a missing one)."""
    if type(err).__name__ == "InstantiationException" and isinstance(cause, ImportError):
        return True
    return isinstance(cause, TypeError) and bool(_BINDING_ERROR.search(str(cause)))
