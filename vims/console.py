"""Terminal output shared by every command: JSON for scripts, rich for people, progress on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

#: Human-readable output goes to stdout; progress and errors to stderr, so ``--json`` stays clean.
out = Console()
err = Console(stderr=True)


def _default(obj: Any) -> Any:
    # numpy scalars and arrays, paths and times appear in reports; everything else is a bug.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_json(obj: Any, indent: int | None = 2) -> str:
    """Serialise ``obj`` to JSON, accepting numpy values, paths and datetimes.

    >>> import numpy as np
    >>> to_json({"n": np.int64(3), "xs": np.arange(2)}, indent=None)
    '{"n": 3, "xs": [0, 1]}'
    """
    return json.dumps(obj, default=_default, indent=indent, allow_nan=False)


def print_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (what every ``--json`` flag does)."""
    sys.stdout.write(to_json(obj) + "\n")
    sys.stdout.flush()


def progress(transient: bool = True) -> Progress:
    """A progress bar on stderr; it draws nothing when stderr is not a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a progress bar on stderr."""
    with progress() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
