"""Summaries of trace tables: what ``vims datasets info`` and the importers print."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Columns counted by value in a summary.
GROUPS = ("source", "split", "label", "family", "program")


def summarize(table: pa.Table) -> dict[str, Any]:
    """Counts by split, label, family and program, and length statistics of a trace table.

    >>> from vims.datasets.traces import Trace, trace_table
    >>> s = summarize(trace_table([Trace("a", "unm", np.array([1, 2, 3], np.int32)),
    ...                            Trace("b", "unm", np.array([], np.int32), label="attack")]))
    >>> s["traces"], s["empty_traces"], s["by"]["label"], s["length"]["max"]
    (2, 1, {'attack': 1, 'normal': 1}, 3)
    """
    lengths = table.column("length").to_numpy(zero_copy_only=False)
    by: dict[str, dict[str, int]] = {}
    for column in GROUPS:
        counts = pc.value_counts(table.column(column).fill_null("(none)"))
        by[column] = dict(sorted((str(v["values"]), int(v["counts"])) for v in counts.to_pylist()))
    stats = {"min": 0, "median": 0.0, "mean": 0.0, "max": 0}
    if len(lengths):
        stats = {"min": int(lengths.min()), "median": float(np.median(lengths)),
                 "mean": round(float(lengths.mean()), 2), "max": int(lengths.max())}
    return {
        "traces": table.num_rows,
        "syscalls": int(lengths.sum()),
        "distinct_syscalls": len(pc.unique(pc.list_flatten(table.column("syscalls")))),
        "empty_traces": int((lengths == 0).sum()),
        "length": stats,
        "by": by,
    }
