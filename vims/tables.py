"""Reading and writing VIMS tables: Parquet on disk, written atomically.

Every command that writes a table goes through :func:`write_table`, so a failed run never leaves
a partial file behind, and every command that reads one goes through :func:`read_table`, so a wrong
or damaged file gives one clear line instead of a traceback.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vims.errors import InputError
from vims.schemas import conform


def write_table(table: pa.Table, path: str | Path, schema: pa.Schema | None = None) -> Path:
    """Write ``table`` to Parquet at ``path`` atomically (temporary file, then rename).

    If ``schema`` is given, the table is conformed to it first.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError("is a folder; name a Parquet file to write", where=path)
    if schema is not None:
        table = conform(table, schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        # mkstemp creates 0600; the table gets the mode any new file gets under the user's umask.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_table(path: str | Path, schema: pa.Schema | None = None) -> pa.Table:
    """Read a Parquet table, optionally conformed to ``schema``.

    Raises :class:`~vims.errors.InputError` for a missing, unreadable or mis-shaped file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", where=path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a Parquet file: {exc}", where=path) from exc
    return conform(table, schema, where=str(path)) if schema is not None else table
