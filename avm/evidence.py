"""The evidence a report shows: the calls of a process's rarest window, as text.

A scorer keeps a batch's calls (in process order) in a :class:`BatchCalls`, and of every process the
last ``window - 1`` calls (:meth:`BatchCalls.tail`), so that a window reaching back into earlier
batches can still be shown. :func:`window_text` turns one window into lines, one per call: its name,
the path or command line it used, and its call site, ``*`` marking the surprising ones.

>>> import numpy as np
>>> b = BatchCalls(np.array([59, 257]), np.array([0x401000, 0x401004]), [None, "/etc/shadow"],
...                ["sh -c id", None], [None, "libc.so.6+0x10"])
>>> window_text(None, b, 0, 1, np.array([0.0, 1.0]))
[' execve sh -c id @0x401000', '*openat /etc/shadow @libc.so.6+0x10']
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vims.syscalls import name as syscall_name

#: Calls shown in the evidence of one window, at most.
EVIDENCE_CALLS = 20

#: A process's last calls: ``(nr, ip, paths, argvs, sites)`` (the last three lists or None).
Tail = tuple[Any, ...]


class BatchCalls:
    """A batch's calls in process order: numbers, call sites, paths, command lines, call-site tokens."""

    def __init__(self, nr: np.ndarray, ip: np.ndarray, paths: list[str | None] | None,
                 argvs: list[str | None] | None, sites: list[str | None] | None) -> None:
        self.nr, self.ip, self.paths, self.argvs, self.sites = nr, ip, paths, argvs, sites

    def call(self, r: int) -> str:
        """Row ``r`` as text."""
        return call_text((self.nr, self.ip, self.paths, self.argvs, self.sites), r)

    def tail(self, old: Tail | None, lo: int, hi: int, keep: int) -> Tail:
        """The last ``keep`` calls of a process: ``old`` (its earlier tail) followed by rows ``lo:hi``."""
        lo2 = max(lo, hi - keep)
        new = [self.nr[lo2:hi], self.ip[lo2:hi]] + [None if col is None else col[lo2:hi]
                                                     for col in (self.paths, self.argvs, self.sites)]
        if old is None or hi - lo2 >= keep:
            return tuple(new)
        need = keep - (hi - lo2)
        n_old = len(old[0])
        out: list[Any] = [np.concatenate([old[0][-need:], new[0]]), np.concatenate([old[1][-need:], new[1]])]
        for o, x in zip(old[2:], new[2:], strict=True):
            if o is None and x is None:
                out.append(None)
            else:
                out.append(list(o if o is not None else [None] * n_old)[-need:]
                           + list(x if x is not None else [None] * (hi - lo2)))
        return tuple(out)


def call_text(raw: Tail, r: int) -> str:
    """One call as text: name, path or command line, call site."""
    nr, ip, paths, argvs, sites = raw
    what = (argvs[r] if argvs is not None and argvs[r] else None) or (paths[r] if paths is not None else None)
    site = sites[r] if sites is not None and sites[r] else f"0x{int(ip[r]):x}"
    return f"{syscall_name(int(nr[r]))}{f' {what}' if what else ''} @{site}"


def window_text(tail: Tail | None, b: BatchCalls, lo: int, j: int, surprise: np.ndarray) -> list[str]:
    """The calls of the window ending at a process's call ``lo + j`` of ``b`` (the last ``len(surprise)``,
    the oldest from its earlier ``tail``); ``*`` marks the surprising ones."""
    size = len(surprise)
    from_batch = min(size, j + 1)
    lines: list[str] = []
    old = size - from_batch  # calls from the previous batches' tail
    if old and tail is not None:
        lines.extend(call_text(tail, i) for i in range(len(tail[0]) - old, len(tail[0])))
    lines.extend(b.call(r) for r in range(lo + j + 1 - from_batch, lo + j + 1))
    marks = surprise[len(surprise) - len(lines):]
    return [("*" if m > 0 else " ") + line for m, line in zip(marks, lines, strict=True)]
