"""Program runs: where a task's system calls are cut into runs of one program, and the program's name.

The one definition every part uses (the capture importer :mod:`vims.datasets.capture` and the A-VM's
scorer :mod:`vims.avm.scoring`, so that live scores equal batch scores of imported traces). Within
one task's calls (in order), a run starts at the first of a run of ``execve`` calls (the call that
starts a program belongs to the new program's run, as in ADFA-LD; a shell trying ``$PATH`` entries
one by one starts one program, not several) and after ``exit``/``exit_group`` (the pid may be
reused). The calls are those of :data:`vims.syscalls.EXECVE_CALLS` and :data:`vims.syscalls.EXIT_CALLS`.

A run that starts with ``execve`` is named by the base name of the path its last leading ``execve``
ran (the one that worked); a program that re-runs itself (``/proc/self/exe``, as busybox does to
start its applets) by its ``argv[0]``; any other run by the task's ``comm``.

>>> import numpy as np
>>> runs = cut_runs(np.array([True, False, False, False, False]), np.array([0, 59, 59, 1, 231]))
>>> runs.starts.tolist(), runs.ends.tolist(), runs.exec_row(1)
([0, 1], [1, 5], 2)
>>> program_name("sh", "/proc/self/exe", "cat /etc/passwd"), program_name("sh", None, None)
('cat', 'sh')
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vims.syscalls import EXECVE_CALLS, EXIT_CALLS

_EXECVE = np.array(sorted(EXECVE_CALLS), dtype=np.int64)
_EXIT = np.array(sorted(EXIT_CALLS), dtype=np.int64)


@dataclass(frozen=True)
class Runs:
    """Rows of calls cut into runs: run ``g`` is rows ``starts[g]:ends[g]``.

    Attributes
    ----------
    starts, ends : numpy.ndarray
        First row and one past the last row of each run.
    is_exec, is_exit : numpy.ndarray of bool
        Per row: the call starts a program (``execve``), or ends the task (``exit``).
    """

    starts: np.ndarray
    ends: np.ndarray
    is_exec: np.ndarray
    is_exit: np.ndarray

    def exec_row(self, g: int) -> int | None:
        """The row of the ``execve`` that started run ``g`` (the last of its leading run), or None."""
        lo, hi = int(self.starts[g]), int(self.ends[g])
        if not self.is_exec[lo]:
            return None
        last = lo
        while last + 1 < hi and self.is_exec[last + 1]:
            last += 1
        return last


def cut_runs(new_task: np.ndarray, nr: np.ndarray, programs: bool = True) -> Runs:
    """Cut rows of calls, grouped by task and in order within each, into program runs.

    Parameters
    ----------
    new_task : numpy.ndarray of bool
        True where a row belongs to another task than the row before (True at row 0).
    nr : numpy.ndarray of int
        The x86-64 system call numbers.
    programs : bool
        Cut at ``execve`` and after ``exit`` too (else a run is a task's rows: a replay of trace
        tables, whose numbers may be another architecture's).
    """
    n = len(nr)
    if programs:
        is_exec, is_exit = np.isin(nr, _EXECVE), np.isin(nr, _EXIT)
    else:
        is_exec = is_exit = np.zeros(n, dtype=bool)
    cut = np.asarray(new_task, dtype=bool).copy()
    if programs and n:
        cut[1:] |= (is_exec[1:] & ~is_exec[:-1]) | is_exit[:-1]
    starts = np.flatnonzero(cut)
    return Runs(starts, np.append(starts[1:], n), is_exec, is_exit)


def base_name(path: str) -> str:
    """The last component of ``path``.

    >>> base_name("/usr/bin/ls/")
    'ls'
    """
    return path.rstrip("/").rsplit("/", 1)[-1]


def program_name(comm: str, path: str | None, argv: str | None) -> str:
    """The name of the program a run runs: from its ``execve``'s ``path`` and ``argv``, else ``comm``."""
    name = base_name(path) if path else ""
    if path == "/proc/self/exe" and argv:
        name = base_name(argv.split(" ", 1)[0]) or name
    return name or comm


def program_at(starts: Sequence[int], names: Sequence[str], seq: int) -> str:
    """The program a task ran at event ``seq``: of its program runs (their first events' ``starts``,
    ascending, and ``names``), the latest that began before ``seq``; the first if all began later.

    What started a forked process is the program its parent ran when the child began, not the one
    the parent runs now (a shell that forks a child and then runs its last command in its own task).

    >>> program_at([0, 5], ["bash", "wc"], 3), program_at([0, 5], ["bash", "wc"], 9), program_at([4], ["sh"], 1)
    ('bash', 'wc', 'sh')
    """
    return names[max(bisect.bisect_right(starts, seq) - 1, 0)]
