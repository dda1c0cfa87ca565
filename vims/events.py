"""Made-up event tables (:data:`~vims.schemas.EVENT_SCHEMA`) for examples, tests and benchmarks.

One builder, :func:`example_events`, from either each process's calls or rows of single events.

>>> example_events({5: [0, 1], ("vm-2", 5): [2]}, interleave=1).select(["vm_id", "pid", "nr"]).to_pylist()
... # doctest: +NORMALIZE_WHITESPACE
[{'vm_id': 'vm-1', 'pid': 5, 'nr': 0}, {'vm_id': 'vm-2', 'pid': 5, 'nr': 2}, {'vm_id': 'vm-1', 'pid': 5, 'nr': 1}]
>>> example_events([(7, "sh", 59, "/bin/cat"), (7, "cat", 0, None)], vm_id="vm").select(["comm", "path"]).to_pylist()
[{'comm': 'sh', 'path': '/bin/cat'}, {'comm': 'cat', 'path': None}]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from vims.schemas import EVENT_SCHEMA, conform

#: One event: ``(pid, comm, nr, path)``.
Row = tuple[int, str, int, str | None]
#: A process: its pid, or ``(vm_id, pid)``.
ProcessKey = int | tuple[str, int]


def _order(calls: Mapping[ProcessKey, Sequence[int]], interleave: int) -> list[tuple[ProcessKey, int]]:
    """``(process, index)`` of every call: one process after the other, or dealt out in chunks."""
    if interleave <= 0:
        return [(key, i) for key, seq in calls.items() for i in range(len(seq))]
    order: list[tuple[ProcessKey, int]] = []
    cursors = {key: 0 for key in calls if len(calls[key])}
    while cursors:
        for key in list(cursors):
            i = cursors[key]
            order.extend((key, j) for j in range(i, min(i + interleave, len(calls[key]))))
            cursors[key] = i + interleave
            if cursors[key] >= len(calls[key]):
                del cursors[key]
    return order


def example_events(calls: Mapping[ProcessKey, Sequence[int]] | Sequence[Row], *, comm: str = "prog",
                   vm_id: str | Sequence[str] = "vm-1", interleave: int = 0, start_seq: int = 0,
                   ts_ns: int = 0) -> pa.Table:
    """An EVENT_SCHEMA table of made-up events.

    Parameters
    ----------
    calls : mapping or sequence of rows
        Either each process's system call numbers (key: ``pid``, or ``(vm_id, pid)``; every call
        has ``comm``), or :data:`Row` tuples ``(pid, comm, nr, path)``, one event each, in order.
    comm : str
        The ``comm`` of every call given by process.
    vm_id : str or sequence of str
        The VM of every event (one per row for rows; processes keyed by ``(vm_id, pid)`` keep theirs).
    interleave : int
        For calls by process: > 0 deals them out in chunks of that many (round robin) instead of one
        process after the other.
    start_seq, ts_ns : int
        The first event's ``seq`` and time; events are numbered on, 1 µs apart. Call sites
        (``user_ip``) are the call's position in its process.
    """
    if isinstance(calls, Mapping):
        order = _order(calls, interleave)
        keys = [k if isinstance(k, tuple) else (vm_id, k) for k, _ in order]
        vms = [str(k[0]) for k in keys]
        pids = [int(k[1]) for k in keys]
        nrs = [int(calls[k][i]) for k, i in order]
        comms, idx = [comm] * len(order), [i for _, i in order]
        paths: list[str | None] = [None] * len(order)
    else:
        rows = list(calls)
        vms = [vm_id] * len(rows) if isinstance(vm_id, str) else [str(v) for v in vm_id]
        pids, comms, nrs = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        paths, idx = [r[3] for r in rows], [0] * len(rows)
    n = len(pids)
    return conform(pa.table({
        "seq": pa.array(np.arange(start_seq, start_seq + n, dtype=np.uint64)),
        "ts_ns": pa.array(ts_ns + 1000 * np.arange(n, dtype=np.uint64)),
        "vm_id": pa.array(vms, pa.string()),
        "vcpu": pa.array(np.zeros(n, dtype=np.uint16)),
        "pid": pa.array(pids, pa.int32()),
        "tgid": pa.array(pids, pa.int32()),
        "comm": pa.array(comms, pa.string()),
        "cr3": pa.array(np.zeros(n, dtype=np.uint64)),
        "nr": pa.array(nrs, pa.int32()),
        "args": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6 * n, dtype=np.uint64)), 6),
        "user_ip": pa.array((0x400000 + 4 * np.asarray(idx, dtype=np.int64)).astype(np.uint64)),
        "path": pa.array(paths, pa.string()),
    }), EVENT_SCHEMA)
