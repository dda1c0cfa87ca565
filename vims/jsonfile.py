"""Reading a JSON file a user gave: one clear error naming the file (and line) for what cannot be read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vims.errors import InputError

__all__ = ["read_json"]


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value in ``path``; :class:`InputError` naming ``what`` and the place when it cannot be had.

    >>> import tempfile, os
    >>> bad = os.path.join(tempfile.mkdtemp(), "t.json")
    >>> _ = open(bad, "w").write('{"a": 1,\\n oops}')
    >>> read_json(bad, "ground truth")
    Traceback (most recent call last):
    ...
    vims.errors.InputError: ...t.json:2: not JSON: Expecting property name enclosed in double quotes
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read the {what}: {exc.strerror or exc}", where=path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from None
