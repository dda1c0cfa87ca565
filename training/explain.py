"""Why a trace was flagged: its rarest windows of calls, by name (``vims score --explain``).

A per-call detector (:class:`~vims.models.base.CallDetector`: stide, ngram, mlp) gives every call a
*surprise*; a window is ``window`` consecutive calls (the detector's own ``window``, 20 by default) and
its rarity is their mean surprise, as in the A-VM's report evidence (:mod:`vims.avm.evidence`). An
ensemble explains by the mean surprise of its per-call members (a whole-trace member such as knn has
no per-call view); a model set by the detector of each trace's program. Calls are named from the
system call table of the data's ABI (:mod:`vims.syscalls`: ``i386`` for ADFA-LD, ``x86_64`` for VIMS
captures) or from a map of their own (UNM's ``syscallMap.txt``, :func:`vims.datasets.unm.syscall_map`).

>>> from vims.models.stide import Stide
>>> det = Stide(k=2, window=3).fit([[3, 4, 3, 4, 3, 4]])
>>> w = rarest_windows(det, [3, 4, 3, 4, 4, 3, 4, 3, 4], n=1)[0]
>>> w.start, round(w.mean, 3), window_line(w, abi="i386")
(2, 0.333, 'calls 2-4, mean surprise 0.333: read write *write')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from vims.errors import InputError
from vims.models._seq import Flat, as_flat
from vims.models.base import CallDetector
from vims.syscalls import name as syscall_name

#: The ABI of each trace ``source`` (the data set's numbering); others need a map.
ABI_OF_SOURCE = {"adfa-ld": "i386", "vims": "x86_64"}


@dataclass(frozen=True)
class Window:
    """One window of a trace: calls ``start`` to ``start + len(calls) - 1``, their surprises and mean."""

    start: int
    calls: np.ndarray
    surprise: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.surprise.mean()) if len(self.surprise) else 0.0


def _call_members(det: Any) -> list[CallDetector]:
    if isinstance(det, CallDetector):
        return [det]
    members = [m for _, m in getattr(det, "members_", []) if isinstance(m, CallDetector)]
    if not members:
        raise InputError(f"a {type(det).__name__} scores whole traces, not calls: --explain needs a per-call "
                         "detector (stide, ngram, mlp, or an ensemble holding one)")
    return members


def call_surprises(det: Any, calls: Any) -> tuple[np.ndarray, int]:
    """The surprise of every call of one trace, and the window the detector sums them over."""
    members = _call_members(det)
    flat = as_flat([np.asarray(calls, dtype=np.int64)])
    surprise = np.mean([m.call_scores(flat).values for m in members], axis=0)
    return np.asarray(surprise, dtype=float), int(members[0].window)


def rarest_windows(det: Any, calls: Any, n: int = 3, window: int | None = None) -> list[Window]:
    """The ``n`` rarest non-overlapping windows of one trace (highest mean surprise first).

    Parameters
    ----------
    det : Detector
        A fitted per-call detector or an ensemble holding one.
    calls : array-like of int
        The trace's system call numbers.
    n : int
        Windows to return at most.
    window : int, optional
        Calls per window (default: the detector's ``window``); a shorter trace is one window.
    """
    calls = np.asarray(calls, dtype=np.int64)
    surprise, own = call_surprises(det, calls)
    size = min(int(window or own), len(calls))
    if size == 0:
        return []
    csum = np.concatenate([[0.0], np.cumsum(surprise)])
    means = (csum[size:] - csum[:-size]) / size  # the window starting at each call
    taken = np.zeros(len(calls), dtype=bool)
    out: list[Window] = []
    for start in np.argsort(-means, kind="stable").tolist():
        if len(out) == n:
            break
        if taken[start:start + size].any():
            continue
        taken[start:start + size] = True
        out.append(Window(start, calls[start:start + size], surprise[start:start + size]))
    return out


def namer(abi: str | None = None, names: Mapping[int, str] | None = None) -> Callable[[int], str]:
    """A call's name: from ``names`` (a data set's own map) if given, else the table of ``abi``."""
    if names is not None:
        return lambda nr: names.get(int(nr), f"sys_{int(nr)}")
    if abi is None:
        return lambda nr: f"sys_{int(nr)}"
    syscall_name(0, abi)  # an unknown ABI is refused here, once
    return lambda nr: syscall_name(nr, abi)


def window_line(w: Window, abi: str | None = None, names: Mapping[int, str] | None = None) -> str:
    """One window as text: its calls by name, ``*`` marking the surprising ones (at or above the window's mean)."""
    name = namer(abi, names)
    mean = w.mean
    marked = [("*" if s > 0 and s >= mean else "") + name(c)
              for c, s in zip(w.calls.tolist(), w.surprise.tolist(), strict=True)]
    calls = " ".join(marked)
    return f"calls {w.start}-{w.start + len(w.calls) - 1}, mean surprise {mean:.3g}: {calls}"


def abi_of(table: pa.Table) -> str | None:
    """The ABI of a trace table's calls, from its ``source`` (None when unknown or mixed)."""
    sources = set(table.column("source").to_pylist()) if "source" in table.column_names else set()
    abis = {ABI_OF_SOURCE.get(str(s)) for s in sources}
    return abis.pop() if len(abis) == 1 else None


def explain_table(det: Any, table: pa.Table, scores: pa.Table, n: int = 3, abi: str | None = None,
                  names: Mapping[int, str] | None = None) -> list[dict[str, Any]]:
    """Each flagged trace of ``scores`` (rows aligned with ``table``) with its ``n`` rarest windows.

    Returns one entry per flagged trace, most anomalous first: ``trace_id``, ``label``, ``family``,
    ``score`` and ``windows`` (each ``start``, ``mean_surprise``, ``calls`` (names) and ``line``).
    """
    if abi is None and names is None:
        abi = abi_of(table)
    name = namer(abi, names)
    flagged = np.flatnonzero(np.asarray(scores.column("anomalous").to_pylist(), dtype=bool))
    score = np.asarray(scores.column("score").to_pylist(), dtype=float)
    flat: Flat = as_flat(table)
    programs = table.column("program").to_pylist() if "program" in table.column_names else [None] * table.num_rows
    out = []
    for i in flagged[np.argsort(-score[flagged], kind="stable")].tolist():
        model = det.for_program(programs[i])[1] if hasattr(det, "for_program") else det
        calls = flat.values[flat.offsets[i]:flat.offsets[i + 1]]
        windows = rarest_windows(model, calls, n=n)
        out.append({
            "trace_id": scores.column("trace_id")[i].as_py(), "label": scores.column("label")[i].as_py(),
            "family": scores.column("family")[i].as_py(), "score": float(score[i]),
            "windows": [{"start": w.start, "mean_surprise": round(w.mean, 6),
                         "calls": [name(c) for c in w.calls.tolist()], "line": window_line(w, abi, names)}
                        for w in windows],
        })
    return out
