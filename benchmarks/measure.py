"""What the benchmarks measure with, written once: a process's CPU time and percentiles.

The benchmarks run as scripts (``python benchmarks/bench_NAME.py``), so their folder is on ``sys.path``
and they import this module as ``measure``; the tests import it as ``benchmarks.measure``. Its name does
not start with ``bench_``, so ``tests/test_benchmarks.py`` does not run it as a benchmark.

>>> pct([5.0, 1.0, 3.0, 2.0, 4.0], 0.5)
3.0
>>> pct([], 0.99) is None
True
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system, in seconds) that process ``pid`` has used so far (Linux ``/proc``).

    Parameters
    ----------
    pid : int
        A running process (or a zombie not yet reaped).

    Returns
    -------
    float
        ``utime + stime`` of ``/proc/PID/stat``, in seconds.
    """
    # The command name (field 2) may hold spaces and parentheses: the fields after it follow the last ")".
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``values`` (nearest rank, 0 <= q <= 1); None when there are none.

    Parameters
    ----------
    values : list of float
        The measurements (any order).
    q : float
        The quantile: 0.5 the median, 0.99 the 99th percentile.
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
