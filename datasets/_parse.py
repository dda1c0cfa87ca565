"""Parsing integer tokens with errors that name the file and line."""

from __future__ import annotations

import numpy as np

from vims.errors import InputError

_INT32 = np.iinfo(np.int32)


def parse_ints(text: str, where: str, first_line: int = 1) -> np.ndarray:
    """Parse whitespace-separated integers into an int32 array.

    A token that is not an integer (or does not fit 32 bits) is an :class:`InputError` that names
    ``where`` and the line it is on.

    >>> parse_ints("3 5\\n 7 ", "t.txt").tolist()
    [3, 5, 7]
    >>> parse_ints("3 x", "t.txt")
    Traceback (most recent call last):
    ...
    vims.errors.InputError: t.txt:1: not an integer: 'x'
    """
    tokens = text.split()
    try:
        values = np.array(tokens, dtype=np.int64) if tokens else np.empty(0, np.int64)
    except (ValueError, OverflowError):
        values = None
    if values is not None and (values.size == 0 or (values.min() >= _INT32.min and values.max() <= _INT32.max)):
        return values.astype(np.int32)
    # Slow path, only to say exactly where the bad token is.
    for lineno, line in enumerate(text.splitlines(), start=first_line):
        for token in line.split():
            try:
                value = int(token)
            except ValueError:
                raise InputError(f"not an integer: {token[:40]!r}", where=f"{where}:{lineno}") from None
            if not _INT32.min <= value <= _INT32.max:
                raise InputError(f"system call number out of range: {token[:40]}",
                                 where=f"{where}:{lineno}")
    raise AssertionError("unreachable: a token failed to parse but no bad token was found")


def decode(data: bytes, where: str) -> str:
    """Decode a trace file's bytes as ASCII text, or say that it is not a trace file."""
    if b"\0" in data[:4096]:
        raise InputError("not a trace file (binary content)", where=where)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError("not a trace file (non-ASCII text)", where=f"{where}:{line}") from None
