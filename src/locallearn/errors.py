"""User errors: mistakes in a config, the data, a run folder or a run's settings.

Every exception the user can fix by changing what they asked for derives from
:class:`UserError`; the CLI prints such an error as one line (no traceback) and exits
with status 2. Any other exception is a bug in locallearn and keeps its traceback, so an
internal error never looks like a user's mistake. The subclasses also derive from the
builtin type code used to raise (``ValueError``, ``RuntimeError``), so ``except
ValueError`` around library calls keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Base of every error the user fixes by changing a config, a path or an option."""


class ConfigError(UserError, ValueError):
    """A configuration key or value is not allowed; the message names it and the choices."""


class DataError(UserError, ValueError):
    """A data set cannot be found or read; the message names the path and the fix."""


class RunError(UserError, ValueError):
    """A run folder or checkpoint is missing, busy or unreadable; the message names the path."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on as configured (e.g. a loss became NaN); the message says why."""


@contextmanager
def options_of(what: str) -> Iterator[None]:
    """Turn a ``ValueError``/``TypeError`` raised while building ``what`` from user options
    into a :class:`ConfigError` naming ``what`` (e.g. ``model 'resnet20'``).

    Use it only around a builder called with the user's options, where such an error means
    a bad option rather than a bug.
    """
    try:
        yield
    except UserError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{what}: {e}") from e
