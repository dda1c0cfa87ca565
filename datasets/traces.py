"""Building trace tables: the one way every importer turns sequences into :data:`TRACE_SCHEMA` rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from vims.schemas import TRACE_SCHEMA


@dataclass(frozen=True)
class Trace:
    """One process trace before it becomes a table row."""

    trace_id: str
    source: str
    syscalls: np.ndarray
    label: str = "normal"
    program: str | None = None
    split: str | None = None
    family: str | None = None
    parent: str | None = None


def trace_table(traces: Sequence[Trace]) -> pa.Table:
    """A trace table from :class:`Trace` records, sequences stored without per-element Python work.

    >>> t = trace_table([Trace("a", "unm", np.array([4, 2], np.int32), program="ps"),
    ...                  Trace("b", "unm", np.array([], np.int32), label="attack")])
    >>> t.column("length").to_pylist(), t.column("syscalls").to_pylist()
    ([2, 0], [[4, 2], []])
    """
    lengths = np.fromiter((len(t.syscalls) for t in traces), dtype=np.int32, count=len(traces))
    offsets = np.zeros(len(traces) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = (np.concatenate([np.asarray(t.syscalls, dtype=np.int32) for t in traces])
            if traces else np.empty(0, np.int32))
    columns = {
        "trace_id": pa.array([t.trace_id for t in traces], pa.string()),
        "source": pa.array([t.source for t in traces], pa.string()),
        "program": pa.array([t.program for t in traces], pa.string()),
        "parent": pa.array([t.parent for t in traces], pa.string()),
        "split": pa.array([t.split for t in traces], pa.string()),
        "label": pa.array([t.label for t in traces], pa.string()),
        "family": pa.array([t.family for t in traces], pa.string()),
        "syscalls": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32())),
        "length": pa.array(lengths, pa.int32()),
    }
    return pa.table(columns).cast(TRACE_SCHEMA)
