"""Importer of the collector's own captures: events (``vims collect``) cut into per-process traces.

One trace per task and per program it runs: the events of each ``(vm_id, pid)`` in sequence order,
cut before an ``execve`` (the call that starts a new program belongs to the new program's trace,
as in ADFA-LD) and after ``exit``/``exit_group`` (a pid may be reused). Consecutive ``execve``
calls stay together: a shell trying ``$PATH`` entries one by one starts one program, not several.
``pid`` is the kernel's task id (a thread), so threads of one process give separate traces.

The program is the base name of the path the trace's first ``execve`` ran, or failing that the
task's ``comm``. A program that re-runs itself (``/proc/self/exe``, as busybox does to start its
applets) is named by its ``argv[0]`` when the capture has the collector's ``argv`` column.
Trace ids are ``vims:<vm_id>:<pid>:<seq of the first event>``, stable across
re-imports of the same capture.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vims.datasets.traces import Trace, trace_table
from vims.schemas import EVENT_SCHEMA, TRACE_SCHEMA, conform

#: x86-64 numbers of the calls that start a program, and that end a task.
EXECVE = (59, 322)  # execve, execveat
EXIT = (60, 231)  # exit, exit_group


def traces_from_events(events: pa.Table, label: str = "normal", split: str | None = None,
                       family: str | None = None, source: str = "vims", where: str | None = None) -> pa.Table:
    """Cut an event table (:data:`~vims.schemas.EVENT_SCHEMA`) into a trace table (``TRACE_SCHEMA``).

    Parameters
    ----------
    events : pyarrow.Table
        Events of one or more captures, in any order (they are sorted by ``seq`` within each VM).
    label, split, family : str
        Given to every trace (a capture of a known-clean guest is ``normal``).
    source : str
        The traces' source column.
    where : str, optional
        Named in the error if ``events`` lacks event columns.

    Examples
    --------
    >>> ev = example_events([(7, "sh", 59, "/bin/cat"), (7, "cat", 257, "/etc/passwd"), (7, "cat", 0, None),
    ...                      (8, "sh", 1, None), (7, "cat", 231, None)])
    >>> t = traces_from_events(ev)
    >>> t.select(["trace_id", "program", "syscalls"]).to_pylist()  # doctest: +NORMALIZE_WHITESPACE
    [{'trace_id': 'vims:vm:7:0', 'program': 'cat', 'syscalls': [59, 257, 0, 231]},
     {'trace_id': 'vims:vm:8:3', 'program': 'sh', 'syscalls': [1]}]
    """
    events = conform(events, EVENT_SCHEMA, where=where)
    n = events.num_rows
    if n == 0:
        return trace_table([])
    vm_codes = pc.dictionary_encode(events["vm_id"]).combine_chunks()
    vm = vm_codes.indices.to_numpy(zero_copy_only=False)
    pid = events["pid"].to_numpy()
    seq = events["seq"].to_numpy()
    order = np.lexsort((seq, pid, vm))
    vm, pid, seq = vm[order], pid[order], seq[order]
    nr = events["nr"].to_numpy()[order]

    is_exec = np.isin(nr, EXECVE)
    is_exit = np.isin(nr, EXIT)
    new = np.ones(n, dtype=bool)
    new[1:] = (
        (vm[1:] != vm[:-1]) | (pid[1:] != pid[:-1])
        | (is_exec[1:] & ~is_exec[:-1])  # a program starts; a run of execve's is one start
        | is_exit[:-1]  # the task ended; what follows is a new task with a reused pid
    )
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], n)

    comm = events["comm"].take(pa.array(order)).to_pylist()
    path = events["path"].take(pa.array(order)).to_pylist()
    argv = events["argv"].take(pa.array(order)).to_pylist()
    vm_names = vm_codes.dictionary.to_pylist()
    traces = []
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        program = comm[start]
        # The last execve of the leading run is the one that worked (earlier ones tried other paths).
        last = start
        while last + 1 < end and is_exec[last + 1]:
            last += 1
        exe, words = path[last], argv[last]
        if is_exec[start] and exe:
            program = _base(exe) or program
            if exe == "/proc/self/exe" and words:
                program = _base(words.split(" ", 1)[0]) or program
        traces.append(Trace(
            trace_id=f"{source}:{vm_names[vm[start]]}:{pid[start]}:{seq[start]}",
            source=source, syscalls=nr[start:end], label=label, program=program, split=split,
            family=family,
        ))
    return trace_table(traces).cast(TRACE_SCHEMA)


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def example_events(rows: list[tuple[int, str, int, str | None]], vm_id: str = "vm") -> pa.Table:
    """A small event table from ``(pid, comm, nr, path)`` rows, in order (for examples and tests).

    >>> example_events([(1, "init", 0, None)]).num_rows
    1
    """
    n = len(rows)
    return conform(pa.table({
        "seq": pa.array(range(n), pa.uint64()),
        "ts_ns": pa.array(range(n), pa.uint64()),
        "vm_id": [vm_id] * n,
        "vcpu": pa.array([0] * n, pa.uint16()),
        "pid": pa.array([r[0] for r in rows], pa.int32()),
        "tgid": pa.array([r[0] for r in rows], pa.int32()),
        "comm": [r[1] for r in rows],
        "cr3": pa.array([0] * n, pa.uint64()),
        "nr": pa.array([r[2] for r in rows], pa.int32()),
        "args": pa.array([[0] * 6] * n, pa.list_(pa.uint64(), 6)),
        "user_ip": pa.array([0] * n, pa.uint64()),
        "path": pa.array([r[3] for r in rows], pa.string()),
    }), EVENT_SCHEMA)
