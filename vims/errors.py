"""Errors a user can cause and fix.

Anything raised as :class:`VimsError` reaches the user as one line on stderr and exit status 2,
never as a traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class VimsError(Exception):
    """A problem with the user's input or environment, explained in one line.

    Parameters
    ----------
    message : str
        What was wrong, in words the user can act on.
    where : str or Path, optional
        The file (and line, as ``file:line``) the problem was found in.

    Examples
    --------
    >>> str(VimsError("not an integer: 'x'", where="trace.txt:3"))
    "trace.txt:3: not an integer: 'x'"
    """

    exit_code = 2

    def __init__(self, message: str, where: str | Path | None = None) -> None:
        self.message = message
        self.where = None if where is None else str(where)
        super().__init__(f"{self.where}: {message}" if self.where else message)


class InputError(VimsError):
    """Malformed input: a file, a message or an argument that does not have the expected form."""


class MissingDependencyError(VimsError):
    """Something the machine lacks (a program, a port, a guest image), with how to fix it."""
