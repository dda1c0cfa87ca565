"""Per-process window scores from event batches: what each scorer worker runs.

A :class:`WindowScorer` keeps, for every process, the last calls it made, and turns each event batch
into per-call *surprises* through the process's detector (a :class:`~vims.models.base.CallDetector`,
or the one a model set picks for its program). A process is a pid running one program: as the
capture importer cuts traces (:mod:`vims.datasets.capture`), a run of ``execve`` calls starts a new
one, named by the path it executed (by ``argv[0]`` for busybox's ``/proc/self/exe``; a process seen
first in mid-run is named by its ``comm``), and ``exit``/``exit_group`` ends it. So scores of a live
stream equal batch scores of the traces ``vims datasets import vims`` cuts from the same events.
From the surprises the scorer keeps two things:

- the **trace score**: the anomaly score batch scoring gives the process's calls so far
  (``detector.anomaly_score([calls])``: the mean surprise, or the largest mean over ``window``
  consecutive calls for ``aggregate="window"`` detectors), so a replayed capture scores exactly as
  batch scoring does;
- the **windows**: every call closes a window, the mean surprise of the process's last ``window``
  calls (fewer at its start). A window is *above threshold* when that mean exceeds the program's
  window threshold (from the model set's calibration, else the detector's own ``-offset_``). The
  rarest window of each batch, with its calls, call sites and paths, is the evidence a report shows.

:meth:`WindowScorer.score` returns one row per process touched by the batch (:data:`RESULT_SCHEMA`).
State is bounded: beyond ``max_processes`` the least recently seen process is forgotten (counted).

>>> import pyarrow as pa
>>> from vims.models.stide import Stide
>>> det = Stide(k=2).fit([[1, 2, 1, 2, 1, 2]])
>>> ws = WindowScorer(det, window=2)
>>> ev = events_from_calls({7: [1, 2, 1, 2], 8: [1, 2, 2, 2]})
>>> out = ws.score(ev)
>>> out.select(["pid", "calls", "windows_above", "score"]).to_pylist()  # doctest: +NORMALIZE_WHITESPACE
[{'pid': 7, 'calls': 4, 'windows_above': 0, 'score': 0.0},
 {'pid': 8, 'calls': 4, 'windows_above': 2, 'score': 0.5}]
>>> det.anomaly_score([[1, 2, 2, 2]]).tolist()
[0.5]
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vims.errors import InputError
from vims.models._seq import BOS
from vims.models.base import CallDetector
from vims.schemas import AVM_RESULT_SCHEMA, EVENT_SCHEMA, conform
from vims.syscalls import name as syscall_name

#: One row per process per scored batch: what a scorer worker sends the aggregator.
RESULT_SCHEMA = AVM_RESULT_SCHEMA

#: x86-64 numbers of the calls that start a program, and that end a task (as vims.datasets.capture).
EXECVE = (59, 322)
EXIT = (60, 231)

#: Calls shown in the evidence of one window, at most.
EVIDENCE_CALLS = 20


@dataclass
class _Proc:
    """What the scorer remembers of one process."""

    ctx: np.ndarray  # last context_ codes (BOS-padded)
    program: str
    n: int = 0
    total: float = 0.0
    best: float = -np.inf  # largest sum over a full window
    tail: np.ndarray = field(default_factory=lambda: np.zeros(0))  # last window-1 surprises
    name: str = ""  # the program it runs (what the capture importer calls the trace's program)
    cmdline: str | None = None
    ppid: int | None = None
    ended: bool = False  # its last call was exit/exit_group: the pid's next call is a new process
    in_exec: bool = False  # its last call was an execve (a run of them starts one program)
    raw: tuple[Any, ...] | None = None  # the last window-1 calls (nr, ip, paths, argvs, sites), for evidence
    shown: float = -np.inf  # the rarest window whose evidence was last sent ...
    shown_at: float = 0.0  # ... and when (monotonic s)


def _threshold_of(det: Any) -> float:
    return float(-det.offset_)


class WindowScorer:
    """Streaming per-process scores of event batches.

    Parameters
    ----------
    model : CallDetector or model set
        A fitted per-call detector, or a model set (anything with ``for_program(name)`` returning
        ``(key, detector)`` and optionally ``window_threshold(key)``).
    window : int, optional
        Calls per window (default: the detector's own ``window`` parameter).
    threshold : float, optional
        Window threshold on the mean surprise, overriding the model's.
    max_processes : int
        Processes remembered at most; the least recently seen is forgotten beyond.
    segment : bool
        Cut processes into program runs at ``execve`` and ``exit`` (x86-64 numbers). Off for replays of
        trace tables, where every pid is one trace already (and numbers may be another architecture's).
    evidence_every : float
        Seconds between two evidence extracts of one process, unless its rarest window gets rarer
        (extracting names for every batch would cost more than scoring it).
    """

    def __init__(self, model: Any, window: int | None = None, threshold: float | None = None,
                 max_processes: int = 65536, evidence_every: float = 0.5, segment: bool = True) -> None:
        self.model = model
        self.segment = segment
        self.evidence_every = evidence_every
        self.window = window
        self.threshold = threshold
        self.max_processes = max_processes
        self.procs: OrderedDict[int, _Proc] = OrderedDict()
        self.evicted = 0
        self._resolved: dict[str, tuple[str, CallDetector, int, float]] = {}
        if not hasattr(model, "for_program"):
            self._check_detector(model)

    @staticmethod
    def _check_detector(det: Any) -> CallDetector:
        if not isinstance(det, CallDetector):
            raise InputError(f"the A-VM pipeline scores call by call and needs a per-call detector "
                             f"(stide, ngram, mlp), not {type(det).__name__}")
        if not hasattr(det, "offset_"):
            raise InputError(f"this {type(det).__name__} is not fitted")
        return det

    def _resolve(self, comm: str) -> tuple[str, CallDetector, int, float]:
        hit = self._resolved.get(comm)
        if hit is not None:
            return hit
        if hasattr(self.model, "for_program"):
            key, det = self.model.for_program(comm)
            thr = getattr(self.model, "window_threshold", lambda k: None)(key)
        else:
            key, det, thr = "*", self.model, None
        det = self._check_detector(det)
        window = int(self.window if self.window is not None else getattr(det, "window", 20))
        if self.threshold is not None:
            thr = self.threshold
        hit = (str(key), det, window, float(_threshold_of(det) if thr is None else thr))
        self._resolved[comm] = hit
        return hit

    def trace_scores(self) -> dict[tuple[int, str], float]:
        """The trace score of every remembered process, keyed by ``(pid, program)``."""
        out = {}
        for pid, p in self.procs.items():
            _, det, window, _ = self._resolve(p.name)
            out[(pid, p.name)] = self._trace_score(p, det, window)
        return out

    @staticmethod
    def _trace_score(p: _Proc, det: CallDetector, window: int) -> float:
        if p.n == 0:
            return 0.0
        if getattr(det, "aggregate", "mean") == "window" and p.n >= window:
            return float(p.best / window)
        return float(p.total / p.n)

    def _new_proc(self, name: str, cmdline: str | None) -> _Proc:
        program, det, _, _ = self._resolve(name)
        return _Proc(ctx=np.full(det.context_, BOS, dtype=np.int64), program=program, name=name, cmdline=cmdline)

    def score(self, events: pa.Table | pa.RecordBatch) -> pa.Table:
        """Score one batch of events (EVENT_SCHEMA columns ``pid``, ``tgid``, ``comm``, ``nr``,
        ``user_ip``, ``seq``, optional ``path``, and the tracer's ``argv``, ``ppid`` and ``site``);
        one :data:`RESULT_SCHEMA` row per process (program run) touched."""
        if isinstance(events, pa.RecordBatch):
            events = pa.Table.from_batches([events])
        if events.num_rows == 0:
            return RESULT_SCHEMA.empty_table()
        for col in ("pid", "comm", "nr"):
            if col not in events.column_names:
                raise InputError(f"event batch lacks column {col!r}")
        n_rows = events.num_rows
        pid_raw = events.column("pid").to_numpy().astype(np.int64)
        order = np.argsort(pid_raw, kind="stable")  # by process, in arrival order within each
        pid = pid_raw[order]
        nr = events.column("nr").to_numpy().astype(np.int64)[order]

        def sorted_col(name: str, dtype: Any, default: int = 0) -> np.ndarray:
            if name not in events.column_names:
                return np.full(n_rows, default, dtype=dtype)
            col = events.column(name)
            if col.null_count:
                col = pc.fill_null(col, default)
            return col.to_numpy().astype(dtype)[order]

        def sorted_strings(name: str) -> list[str | None] | None:
            if name not in events.column_names or events.column(name).null_count == n_rows:
                return None
            return events.column(name).take(pa.array(order)).to_pylist()

        b = _Batch(nr, sorted_col("user_ip", np.uint64), sorted_strings("path"), sorted_strings("argv"),
                   sorted_strings("site"))
        seq = sorted_col("seq", np.uint64)
        tgid = sorted_col("tgid", np.int64) if "tgid" in events.column_names else pid
        ppid = sorted_col("ppid", np.int64, -1)
        comm_col = events.column("comm").take(pa.array(order))
        now = time.monotonic()

        # Segments: one per process and program run, cut as the capture importer cuts traces
        # (vims.datasets.capture): before the first of a run of execve's, after exit/exit_group.
        is_exec = np.isin(nr, EXECVE) if self.segment else np.zeros(n_rows, dtype=bool)
        is_exit = np.isin(nr, EXIT) if self.segment else np.zeros(n_rows, dtype=bool)
        new_pid = np.ones(n_rows, dtype=bool)
        new_pid[1:] = pid[1:] != pid[:-1]
        cut = new_pid.copy()
        cut[1:] |= (is_exec[1:] & ~is_exec[:-1]) | is_exit[:-1]
        starts = np.flatnonzero(cut)
        ends = np.append(starts[1:], n_rows)
        n_seg = len(starts)
        lengths = ends - starts
        procs: list[_Proc] = []
        dets: list[CallDetector] = []
        windows = np.empty(n_seg, dtype=np.int64)
        thresholds = np.empty(n_seg)
        exec_at = np.flatnonzero(is_exec[starts]) if self.segment else np.zeros(0, dtype=np.int64)
        exec_set = set(exec_at.tolist())
        for g, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            p_id = int(pid[lo])
            proc = self.procs.get(p_id)
            starts_exec = g in exec_set
            if proc is None or not new_pid[lo] or proc.ended or (starts_exec and not proc.in_exec):
                proc = self._new_proc(self._program_name(b, comm_col, lo, hi, is_exec) if starts_exec
                                      else str(comm_col[lo].as_py()),
                                      self._cmdline(b, lo, hi, is_exec) if starts_exec else None)
                self.procs[p_id] = proc
            else:
                self.procs.move_to_end(p_id)
            proc.ended = bool(is_exit[hi - 1])
            proc.in_exec = bool(is_exec[hi - 1])
            if ppid[lo] >= 0:
                proc.ppid = int(ppid[lo])
            _, det, windows[g], thresholds[g] = self._resolve(proc.name)
            procs.append(proc)
            dets.append(det)

        # Per-call surprises, one model call per detector over all its segments, each after its context.
        within = np.arange(n_rows) - np.repeat(starts, lengths)  # position of each row in its segment
        surprises = np.empty(n_rows)
        det_ids = np.array([id(d) for d in dets], dtype=np.int64)
        for d_id in np.unique(det_ids):
            gs = np.flatnonzero(det_ids == d_id)
            det = dets[int(gs[0])]
            c = int(det.context_)
            seg_len = lengths[gs]
            if len(gs) == n_seg:
                rows = np.arange(n_rows)
            else:  # the rows of these segments, in order
                rows = np.repeat(starts[gs], seg_len) + (np.arange(int(seg_len.sum()))
                                                         - np.repeat(np.cumsum(seg_len) - seg_len, seg_len))
            padded_start = np.concatenate([[0], np.cumsum(seg_len + c)[:-1]]).astype(np.int64)
            seq_codes = np.empty(int(seg_len.sum()) + c * len(gs), dtype=np.int64)
            at = np.repeat(padded_start + c, seg_len) + within[rows]
            seq_codes[at] = det.vocab_.encode(nr[rows])
            if c:
                ctx_at = padded_start[:, None] + np.arange(c)
                seq_codes[ctx_at] = np.stack([procs[g].ctx for g in gs.tolist()])
                new_ctx = seq_codes[(padded_start + seg_len)[:, None] + np.arange(c)]
                for k, g in enumerate(gs.tolist()):
                    procs[g].ctx = new_ctx[k]
            surprises[rows] = det._call_scores(seq_codes, at)

        # Windows: each segment's last window-1 surprises (zero-padded for young processes) then its new
        # ones, laid end to end, so every window's sum is one difference of one cumulative sum.
        k = int(windows.max()) - 1
        tails = np.zeros((n_seg, k))
        if k:
            for g, proc in enumerate(procs):
                if len(proc.tail):
                    tails[g, k - len(proc.tail):] = proc.tail
        pstart = np.concatenate([[0], np.cumsum(lengths + k)[:-1]]).astype(np.int64)
        padded = np.empty(int(lengths.sum()) + k * n_seg)
        if k:
            padded[pstart[:, None] + np.arange(k)] = tails
        rowpos = np.repeat(pstart + k, lengths) + within
        padded[rowpos] = surprises
        csum = np.concatenate([[0.0], np.cumsum(padded)])
        w_row = np.repeat(windows, lengths)
        wsum = csum[rowpos + 1] - csum[rowpos + 1 - w_row]
        count = np.repeat(np.array([p.n for p in procs], dtype=np.int64), lengths) + within + 1
        wmean = wsum / np.minimum(w_row, count)
        above = np.add.reduceat((wmean > np.repeat(thresholds, lengths)).astype(np.int64), starts)
        top = np.maximum.reduceat(wmean, starts)
        best = np.maximum.reduceat(np.where(count >= w_row, wsum, -np.inf), starts)
        totals = np.add.reduceat(surprises, starts)
        new_tails = padded[(pstart + k + lengths)[:, None] - k + np.arange(k)] if k else np.zeros((n_seg, 0))

        evidence: list[list[str]] = []
        scores = np.empty(n_seg)
        for g, proc in enumerate(procs):
            lo, hi, w = int(starts[g]), int(ends[g]), int(windows[g])
            proc.best = max(proc.best, float(best[g]))
            proc.total += float(totals[g])
            ev: list[str] = []
            if top[g] > thresholds[g] and (top[g] > 1.1 * proc.shown or now - proc.shown_at >= self.evidence_every):
                seg = wmean[lo:hi]
                j = len(seg) - 1 - int(np.argmax(seg[::-1]))  # the latest of equally rare windows: more context
                size = int(min(w, proc.n + j + 1, EVIDENCE_CALLS))
                ev = self._evidence(proc, b, lo, j, padded[rowpos[lo + j] + 1 - size:rowpos[lo + j] + 1])
                proc.shown, proc.shown_at = float(top[g]), now
            proc.n += hi - lo
            proc.tail = new_tails[g, k - (w - 1):].copy() if w > 1 else np.zeros(0)
            if w > 1:
                proc.raw = b.tail(proc.raw, lo, hi, w - 1)
            scores[g] = self._trace_score(proc, dets[g], w)
            evidence.append(ev)
        while len(self.procs) > self.max_processes:
            self.procs.popitem(last=False)
            self.evicted += 1
        last = ends - 1
        return pa.table({
            "pid": pa.array(pid[starts].astype(np.int32)),
            "tgid": pa.array(tgid[starts].astype(np.int32)),
            "ppid": pa.array([p.ppid for p in procs], pa.int32()),
            "comm": comm_col.take(pa.array(last)).combine_chunks() if isinstance(comm_col, pa.ChunkedArray)
            else comm_col.take(pa.array(last)),
            "name": pa.array([p.name for p in procs], pa.string()),
            "cmdline": pa.array([p.cmdline for p in procs], pa.string()),
            "program": pa.array([p.program for p in procs], pa.string()),
            "calls": pa.array(lengths.astype(np.int64)),
            "total_calls": pa.array(np.array([p.n for p in procs], dtype=np.int64)),
            "windows_above": pa.array(above.astype(np.int64)),
            "max_window": pa.array(top.astype(np.float64)),
            "threshold": pa.array(thresholds),
            "score": pa.array(scores),
            "last_seq": pa.array(seq[last]),
            "evidence": pa.array(evidence, pa.list_(pa.string())),
        }, schema=RESULT_SCHEMA)

    @staticmethod
    def _program_name(b: _Batch, comm_col: Any, lo: int, hi: int, is_exec: np.ndarray) -> str:
        """The program a segment that starts with execve runs: as the capture importer names it."""
        last = lo
        while last + 1 < hi and is_exec[last + 1]:
            last += 1
        path = b.paths[last] if b.paths is not None else None
        name = None
        if path:
            name = _base(path)
            argv = b.argvs[last] if b.argvs is not None else None
            if path == "/proc/self/exe" and argv:
                name = _base(argv.split(" ", 1)[0]) or name
        return name or str(comm_col[lo].as_py())

    @staticmethod
    def _cmdline(b: _Batch, lo: int, hi: int, is_exec: np.ndarray) -> str | None:
        last = lo
        while last + 1 < hi and is_exec[last + 1]:
            last += 1
        return b.argvs[last] if b.argvs is not None else None

    def _evidence(self, proc: _Proc, b: _Batch, lo: int, j: int, surprise: np.ndarray) -> list[str]:
        """The calls of the window ending at the segment's call ``j`` (the last ``len(surprise)``);
        ``*`` marks the surprising ones."""
        size = len(surprise)
        from_batch = min(size, j + 1)
        lines = []
        old = size - from_batch  # calls from the previous batches' tail
        raw = proc.raw
        if old and raw is not None:
            for i in range(len(raw[0]) - old, len(raw[0])):
                lines.append(_Batch.text(raw, i))
        lines.extend(b.call(r) for r in range(lo + j + 1 - from_batch, lo + j + 1))
        marks = surprise[len(surprise) - len(lines):]
        return [("*" if m > 0 else " ") + line for m, line in zip(marks, lines, strict=True)]


class _Batch:
    """A batch's calls in process order, and their text for evidence."""

    def __init__(self, nr: np.ndarray, ip: np.ndarray, paths: list[str | None] | None,
                 argvs: list[str | None] | None, sites: list[str | None] | None) -> None:
        self.nr, self.ip, self.paths, self.argvs, self.sites = nr, ip, paths, argvs, sites

    def call(self, r: int) -> str:
        return self.text((self.nr, self.ip, self.paths, self.argvs, self.sites), r)

    @staticmethod
    def text(raw: tuple[Any, ...], r: int) -> str:
        """One call as text: name, path or command line, call site."""
        nr, ip, paths, argvs, sites = raw
        what = (argvs[r] if argvs is not None and argvs[r] else None) or (paths[r] if paths is not None else None)
        site = sites[r] if sites is not None and sites[r] else f"0x{int(ip[r]):x}"
        return f"{syscall_name(int(nr[r]))}{f' {what}' if what else ''} @{site}"

    def tail(self, old: tuple[Any, ...] | None, lo: int, hi: int, keep: int) -> tuple[Any, ...]:
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


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def events_from_calls(calls: Mapping[int, Sequence[int]], comm: str = "prog", vm_id: str = "vm-1",
                      interleave: int = 0, start_seq: int = 0, ts_ns: int = 0) -> pa.Table:
    """An EVENT_SCHEMA table of made-up events: ``calls`` maps pid -> its system call numbers.

    ``interleave`` > 0 deals the processes' calls out in chunks of that many (round robin) instead of
    one process after the other. Call sites are the call's position; ``ts_ns`` 1 µs apart from ``ts_ns``.

    >>> events_from_calls({5: [0, 1], 6: [2]}, interleave=1).column("pid").to_pylist()
    [5, 6, 5]
    """
    order: list[tuple[int, int]] = []  # (pid, index)
    if interleave > 0:
        cursors = {pid: 0 for pid in calls}
        while cursors:
            for pid in list(cursors):
                i = cursors[pid]
                chunk = list(calls[pid][i:i + interleave])
                order.extend((pid, i + k) for k in range(len(chunk)))
                cursors[pid] = i + interleave
                if cursors[pid] >= len(calls[pid]):
                    del cursors[pid]
    else:
        order = [(pid, i) for pid, seq in calls.items() for i in range(len(seq))]
    n = len(order)
    pids = np.array([p for p, _ in order], dtype=np.int32)
    idx = np.array([i for _, i in order], dtype=np.int64)
    nrs = np.array([calls[p][i] for p, i in order], dtype=np.int32)
    return conform(pa.table({
        "seq": pa.array(np.arange(start_seq, start_seq + n, dtype=np.uint64)),
        "ts_ns": pa.array(ts_ns + 1000 * np.arange(n, dtype=np.uint64)),
        "vm_id": pa.array([vm_id] * n, pa.string()),
        "vcpu": pa.array(np.zeros(n, dtype=np.uint16)),
        "pid": pa.array(pids),
        "tgid": pa.array(pids),
        "comm": pa.array([comm] * n, pa.string()),
        "cr3": pa.array(np.zeros(n, dtype=np.uint64)),
        "nr": pa.array(nrs),
        "args": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6 * n, dtype=np.uint64)), 6),
        "user_ip": pa.array((0x400000 + 4 * idx).astype(np.uint64)),
        "path": pa.nulls(n, pa.string()),
    }), EVENT_SCHEMA)
