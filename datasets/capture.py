"""Importer of the collector's own captures: events (``vims collect``) cut into per-process traces.

One trace per task and per program it runs: the events of each ``(vm_id, pid)`` in sequence order,
cut into program runs and named as :mod:`vims.runs` says (the A-VM's scorer cuts and names live
streams the same way). ``pid`` is the kernel's task id (a thread), so threads of one process give
separate traces. Trace ids are ``vims:<vm_id>:<pid>:<seq of the first event>``, stable across
re-imports of the same capture (with ``capture``, ``vims:<capture>:<vm_id>:<pid>:<seq>``: the runs of a
recording each start their ``seq`` at 0). ``parent`` is the program that started the trace: the one
its parent (its first event's ``ppid``) ran when the trace began (the parent's latest program run that
began before it, the first one if all began later; null when the capture holds no call of the
parent), or, for a program that a task's ``execve`` put in place of another, that other one: a shell
that runs its last command in its own task starts it as surely as one that forks first.

With ground truths (:mod:`vims.datasets.truth`), every trace that holds an event of an attack's
processes inside its window is ``label=attack``, ``family`` the truth's, ``split=attack``; the others
keep the ``label``, ``split`` and ``family`` given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vims.datasets.traces import Trace, trace_table
from vims.datasets.truth import GRACE_NS, Truth, attack_marks
from vims.runs import Runs, cut_runs, program_at, program_name
from vims.schemas import EVENT_SCHEMA, TRACE_SCHEMA, conform

__all__ = ["traces_from_events"]


def traces_from_events(events: pa.Table, label: str = "normal", split: str | None = None,
                       family: str | None = None, source: str = "vims", where: str | None = None,
                       truths: Sequence[Truth] = (), capture: str | None = None,
                       grace_ns: int = GRACE_NS) -> pa.Table:
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
        Named in the error if ``events`` lacks event columns (or a truth matches no process).
    truths : sequence of Truth
        Ground truths of attacks in the capture: their processes' traces become attacks.
    capture : str, optional
        Put in every trace id after the source (a run of a recording: its run id).
    grace_ns : int
        Added to each truth's end (:data:`~vims.datasets.truth.GRACE_NS`).

    Examples
    --------
    >>> from vims.events import example_events
    >>> ev = example_events([(7, "sh", 59, "/bin/cat"), (7, "cat", 257, "/etc/passwd"), (7, "cat", 0, None),
    ...                      (8, "sh", 1, None), (7, "cat", 231, None)], vm_id="vm")
    >>> t = traces_from_events(ev)
    >>> t.select(["trace_id", "program", "syscalls"]).to_pylist()  # doctest: +NORMALIZE_WHITESPACE
    [{'trace_id': 'vims:vm:7:0', 'program': 'cat', 'syscalls': [59, 257, 0, 231]},
     {'trace_id': 'vims:vm:8:3', 'program': 'sh', 'syscalls': [1]}]
    >>> t["parent"].to_pylist()  # example_events gives no ppid
    [None, None]
    """
    events = conform(events, EVENT_SCHEMA, where=where)
    n = events.num_rows
    if n == 0:
        if truths:
            attack_marks(events, truths, grace_ns, where=where)  # says that the truths match nothing
        return trace_table([])
    marks = attack_marks(events, truths, grace_ns, where=where)
    vm_codes = pc.dictionary_encode(events["vm_id"]).combine_chunks()
    vm = vm_codes.indices.to_numpy(zero_copy_only=False)
    pid = events["pid"].to_numpy()
    seq = events["seq"].to_numpy()
    order = np.lexsort((seq, pid, vm))
    vm, pid, seq = vm[order], pid[order], seq[order]
    nr = events["nr"].to_numpy()[order]
    marks = marks[order]

    new_task = np.ones(n, dtype=bool)
    new_task[1:] = (vm[1:] != vm[:-1]) | (pid[1:] != pid[:-1])
    runs = cut_runs(new_task, nr)

    comm = events["comm"].take(pa.array(order)).to_pylist()
    path = events["path"].take(pa.array(order)).to_pylist()
    argv = events["argv"].take(pa.array(order)).to_pylist()
    vm_names = vm_codes.dictionary.to_pylist()
    prefix = f"{source}:{capture}:" if capture else f"{source}:"
    attack = np.maximum.reduceat(marks, runs.starts) if len(runs.starts) else marks[:0]
    ppid = pc.fill_null(events["ppid"], -1).to_numpy()[order]
    programs = []
    for g, start in enumerate(runs.starts.tolist()):
        r = runs.exec_row(g)
        programs.append(comm[start] if r is None else program_name(comm[start], path[r], argv[r]))
    parents = _parents(runs, vm, pid, seq, ppid, programs)
    traces = []
    for g, (start, end) in enumerate(zip(runs.starts.tolist(), runs.ends.tolist(), strict=True)):
        hit = truths[attack[g]] if attack[g] >= 0 else None
        traces.append(Trace(
            trace_id=f"{prefix}{vm_names[vm[start]]}:{pid[start]}:{seq[start]}",
            source=source, syscalls=nr[start:end], label="attack" if hit else label, program=programs[g],
            split="attack" if hit else split, family=hit.family if hit else family, parent=parents[g],
        ))
    return trace_table(traces).cast(TRACE_SCHEMA)


def _parents(runs: Runs, vm: np.ndarray, pid: np.ndarray, seq: np.ndarray, ppid: np.ndarray,
             programs: list[str]) -> list[str | None]:
    """Per program run (rows in ``(vm, pid, seq)`` order), the program that started it (the module
    docstring's ``parent``): the one its task ran before its ``execve``, else its parent's."""
    firsts = runs.starts
    v_run, p_run, s_run = vm[firsts].tolist(), pid[firsts].tolist(), seq[firsts].tolist()
    runs_of: dict[tuple[int, int], tuple[list[int], list[str]]] = {}
    for v, p, s, name in zip(v_run, p_run, s_run, programs, strict=True):
        starts, names = runs_of.setdefault((v, p), ([], []))
        starts.append(s)  # in seq order within a task
        names.append(name)
    out: list[str | None] = []
    for g, (v, p, s, pp) in enumerate(zip(v_run, p_run, s_run, ppid[firsts].tolist(), strict=True)):
        if (g and (v, p) == (v_run[g - 1], p_run[g - 1]) and runs.exec_row(g) is not None
                and not runs.is_exit[runs.ends[g - 1] - 1]):
            out.append(programs[g - 1])  # an execve put this program in place of the task's previous one
            continue
        known = runs_of.get((v, pp)) if pp > 0 else None
        if known is None:
            out.append(None)
            continue
        out.append(program_at(known[0], known[1], s))
    return out
