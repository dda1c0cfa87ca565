"""Per-process window scores from event batches: what each scorer worker runs.

A :class:`WindowScorer` keeps, for every process, its detector's streaming state
(:meth:`~vims.models.base.CallDetector.init_state`), and turns each event batch into per-call
*surprises* through the process's detector (a :class:`~vims.models.base.CallDetector`, or the one a
model set picks for its program; :meth:`~vims.models.base.CallDetector.score_streams`). A process is
a task (``(vm_id, pid)``: two VMs' pids never mix) running one program, cut and named as the capture
importer cuts traces (:mod:`vims.runs`: a run of ``execve`` calls starts a new one, named by the path
it executed; a process seen first in mid-run is named by its ``comm``; ``exit``/``exit_group`` ends
it). So scores of a live stream equal batch scores of the traces ``vims datasets import vims`` cuts
from the same events.
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

>>> from vims.events import example_events
>>> from vims.models.stide import Stide
>>> det = Stide(k=2).fit([[1, 2, 1, 2, 1, 2]])
>>> ws = WindowScorer(det, window=2)
>>> ev = example_events({7: [1, 2, 1, 2], 8: [1, 2, 2, 2]})
>>> out = ws.score(ev)
>>> out.select(["vm_id", "pid", "calls", "windows_above", "score"]).to_pylist()  # doctest: +NORMALIZE_WHITESPACE
[{'vm_id': 'vm-1', 'pid': 7, 'calls': 4, 'windows_above': 0, 'score': 0.0},
 {'vm_id': 'vm-1', 'pid': 8, 'calls': 4, 'windows_above': 2, 'score': 0.5}]
>>> det.anomaly_score([[1, 2, 2, 2]]).tolist()
[0.5]
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vims.avm.evidence import EVIDENCE_CALLS, BatchCalls, Tail, window_text
from vims.errors import InputError
from vims.models.base import CallDetector, CallState
from vims.runs import Runs, cut_runs, program_name
from vims.schemas import AVM_RESULT_SCHEMA

#: One row per process per scored batch: what a scorer worker sends the aggregator.
RESULT_SCHEMA = AVM_RESULT_SCHEMA

#: A process: ``(vm_id, pid)``.
Key = tuple[str, int]


@dataclass
class _Proc:
    """What the scorer remembers of one process."""

    state: CallState  # its detector's streaming state
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
    raw: Tail | None = None  # the last window-1 calls, for evidence
    shown: float = -np.inf  # the rarest window whose evidence was last sent ...
    shown_at: float = 0.0  # ... and when (monotonic s)


@dataclass
class _Columns:
    """A batch's columns in process order (by ``(vm_id, pid)``, in arrival order within each)."""

    order: np.ndarray
    vm: list[str]  # the VMs' names, by code
    vm_code: np.ndarray  # each row's VM code
    pid: np.ndarray
    nr: np.ndarray
    seq: np.ndarray
    tgid: np.ndarray
    ppid: np.ndarray
    comm: Any  # pa.Array
    calls: BatchCalls
    new_task: np.ndarray


@dataclass
class _Segments:
    """The program runs of a batch: their processes, detectors, windows and thresholds."""

    runs: Runs
    procs: list[_Proc]
    dets: list[CallDetector]
    windows: np.ndarray
    thresholds: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.runs.ends - self.runs.starts


@dataclass
class _Windows:
    """The window means of a batch's calls, and per segment what the scorer keeps of them."""

    wmean: np.ndarray  # per row: the mean surprise of the window its call closes
    padded: np.ndarray  # each segment's old tail then its surprises, end to end
    rowpos: np.ndarray  # where each row's surprise is in padded
    above: np.ndarray  # per segment: windows above threshold
    top: np.ndarray  # per segment: the rarest window's mean
    best: np.ndarray  # per segment: the largest full-window sum
    totals: np.ndarray  # per segment: the sum of its surprises
    new_tails: np.ndarray  # per segment: its last k surprises
    k: int


def _columns(events: pa.Table, vm_id: str | None) -> _Columns:
    """Sort a batch by process and take the columns the scorer uses (``vm_id``: of a batch without the column)."""
    n = events.num_rows
    names = set(events.schema.names)
    pid_raw = events.column("pid").to_numpy().astype(np.int64)
    vm_col = events.column("vm_id") if "vm_id" in names else None
    if vm_col is not None and not pc.all(pc.equal(vm_col, vm_col[0])).as_py():  # several VMs (rare)
        enc = pc.dictionary_encode(vm_col.combine_chunks())
        vm_code = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        vm_names = [str(v) for v in enc.dictionary.to_pylist()]
    else:
        vm_code = np.zeros(n, dtype=np.int64)
        vm_names = [str(vm_col[0].as_py()) if vm_col is not None else (vm_id or "")]
    key = (vm_code << 32) | (pid_raw & 0xFFFFFFFF) if len(vm_names) > 1 else pid_raw
    order = np.argsort(key, kind="stable")  # by process, in arrival order within each
    key = key[order]

    def col(name: str, dtype: Any, default: int = 0) -> np.ndarray:
        if name not in names:
            return np.full(n, default, dtype=dtype)
        c = events.column(name)
        if c.null_count:
            c = pc.fill_null(c, default)
        return c.to_numpy().astype(dtype)[order]

    def strings(name: str) -> list[str | None] | None:
        if name not in names or events.column(name).null_count == n:
            return None
        return events.column(name).take(pa.array(order)).to_pylist()

    pid = pid_raw[order]
    nr = events.column("nr").to_numpy().astype(np.int64)[order]
    new_task = np.ones(n, dtype=bool)
    new_task[1:] = key[1:] != key[:-1]
    return _Columns(order, vm_names, vm_code[order], pid, nr, col("seq", np.uint64),
                    col("tgid", np.int64) if "tgid" in names else pid, col("ppid", np.int64, -1),
                    events.column("comm").take(pa.array(order)),
                    BatchCalls(nr, col("user_ip", np.uint64), strings("path"), strings("argv"), strings("site")),
                    new_task)


def _surprises(seg: _Segments, n_rows: int, nr: np.ndarray) -> np.ndarray:
    """Every call's surprise: one model pass per detector over all its segments, each after its state."""
    starts, lengths = seg.runs.starts, seg.lengths
    surprises = np.empty(n_rows)
    det_ids = np.array([id(d) for d in seg.dets], dtype=np.int64)
    for d_id in np.unique(det_ids):
        gs = np.flatnonzero(det_ids == d_id)
        det = seg.dets[int(gs[0])]
        seg_len = lengths[gs]
        if len(gs) == len(starts):
            rows = np.arange(n_rows)
        else:  # the rows of these segments, in order
            rows = np.repeat(starts[gs], seg_len) + (np.arange(int(seg_len.sum()))
                                                     - np.repeat(np.cumsum(seg_len) - seg_len, seg_len))
        surprises[rows] = det.score_streams([seg.procs[g].state for g in gs.tolist()], nr[rows], seg_len)
    return surprises


def _windows(seg: _Segments, surprises: np.ndarray) -> _Windows:
    """Window means: each segment's last window-1 surprises (zero-padded for young processes) then its
    new ones, laid end to end, so every window's sum is one difference of one cumulative sum."""
    starts, lengths, windows, procs = seg.runs.starts, seg.lengths, seg.windows, seg.procs
    n_seg = len(starts)
    within = np.arange(len(surprises)) - np.repeat(starts, lengths)  # position of each row in its segment
    k = int(windows.max()) - 1
    pstart = np.concatenate([[0], np.cumsum(lengths + k)[:-1]]).astype(np.int64)
    padded = np.empty(int(lengths.sum()) + k * n_seg)
    if k:
        tails = np.zeros((n_seg, k))
        for g, proc in enumerate(procs):
            if len(proc.tail):
                tails[g, k - len(proc.tail):] = proc.tail
        padded[pstart[:, None] + np.arange(k)] = tails
    rowpos = np.repeat(pstart + k, lengths) + within
    padded[rowpos] = surprises
    csum = np.concatenate([[0.0], np.cumsum(padded)])
    w_row = np.repeat(windows, lengths)
    wsum = csum[rowpos + 1] - csum[rowpos + 1 - w_row]
    count = np.repeat(np.array([p.n for p in procs], dtype=np.int64), lengths) + within + 1
    wmean = wsum / np.minimum(w_row, count)
    return _Windows(
        wmean, padded, rowpos,
        above=np.add.reduceat((wmean > np.repeat(seg.thresholds, lengths)).astype(np.int64), starts),
        top=np.maximum.reduceat(wmean, starts),
        best=np.maximum.reduceat(np.where(count >= w_row, wsum, -np.inf), starts),
        totals=np.add.reduceat(surprises, starts),
        new_tails=padded[(pstart + k + lengths)[:, None] - k + np.arange(k)] if k else np.zeros((n_seg, 0)),
        k=k)


def _trace_score(p: _Proc, det: CallDetector, window: int) -> float:
    """What batch scoring gives the process's calls so far (``det.anomaly_score([calls])``)."""
    if p.n == 0:
        return 0.0
    if det.aggregate == "window" and p.n >= window:
        return float(p.best / window)
    return float(p.total / p.n)


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
        self.procs: OrderedDict[Key, _Proc] = OrderedDict()
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

    def _resolve(self, name: str) -> tuple[str, CallDetector, int, float]:
        """``(model key, detector, window, window threshold)`` of program ``name``."""
        hit = self._resolved.get(name)
        if hit is not None:
            return hit
        if hasattr(self.model, "for_program"):
            key, det = self.model.for_program(name)
            thr = getattr(self.model, "window_threshold", lambda k: None)(key)
        else:
            key, det, thr = "*", self.model, None
        det = self._check_detector(det)
        window = int(self.window if self.window is not None else det.window)
        if self.threshold is not None:
            thr = self.threshold
        hit = (str(key), det, window, float(det.anomaly_threshold if thr is None else thr))
        self._resolved[name] = hit
        return hit

    def trace_scores(self) -> dict[tuple[str, int, str], float]:
        """The trace score of every remembered process, keyed by ``(vm_id, pid, program)``."""
        out = {}
        for (vm, pid), p in self.procs.items():
            _, det, window, _ = self._resolve(p.name)
            out[(vm, pid, p.name)] = _trace_score(p, det, window)
        return out

    def _new_proc(self, name: str, cmdline: str | None) -> _Proc:
        program, det, _, _ = self._resolve(name)
        return _Proc(state=det.init_state(), program=program, name=name, cmdline=cmdline)

    def score(self, events: pa.Table | pa.RecordBatch, vm_id: str | None = None) -> pa.Table:
        """Score one batch of events (EVENT_SCHEMA columns ``pid``, ``comm``, ``nr``, and as far as
        given ``vm_id``, ``tgid``, ``user_ip``, ``seq``, ``path``, ``argv``, ``ppid``, ``site``); one
        :data:`RESULT_SCHEMA` row per process (program run) touched. ``vm_id`` is the VM of every
        event of a batch without that column (as the pipeline's dispatcher sends them)."""
        if isinstance(events, pa.RecordBatch):
            events = pa.Table.from_batches([events])
        if events.num_rows == 0:
            return RESULT_SCHEMA.empty_table()
        names = set(events.schema.names)
        for col in ("pid", "comm", "nr"):
            if col not in names:
                raise InputError(f"event batch lacks column {col!r}")
        cols = _columns(events, vm_id)
        seg = self._segments(cols)
        w = _windows(seg, _surprises(seg, events.num_rows, cols.nr))
        scores, evidence = self._advance(cols, seg, w)
        while len(self.procs) > self.max_processes:
            self.procs.popitem(last=False)
            self.evicted += 1
        return _rows(cols, seg, w, scores, evidence)

    def _segments(self, cols: _Columns) -> _Segments:
        """Cut the batch into program runs and find (or start) the process of each."""
        runs = cut_runs(cols.new_task, cols.nr, programs=self.segment)
        starts, last = runs.starts, runs.ends - 1
        n_seg = len(starts)
        procs: list[_Proc] = []
        dets: list[CallDetector] = []
        windows = np.empty(n_seg, dtype=np.int64)
        thresholds = np.empty(n_seg)
        per_seg = zip(starts.tolist(), cols.vm_code[starts].tolist(), cols.pid[starts].tolist(),
                      cols.new_task[starts].tolist(), runs.is_exec[starts].tolist(), runs.is_exit[last].tolist(),
                      runs.is_exec[last].tolist(), cols.ppid[starts].tolist(), strict=True)
        for g, (lo, vm, pid, new_task, starts_exec, ends_exit, ends_exec, ppid) in enumerate(per_seg):
            key = (cols.vm[vm], pid)
            proc = self.procs.get(key)
            if proc is None or not new_task or proc.ended or (starts_exec and not proc.in_exec):
                proc = self._new_proc(*self._name(cols, lo, runs.exec_row(g)))
                self.procs[key] = proc
            else:
                self.procs.move_to_end(key)
            proc.ended, proc.in_exec = ends_exit, ends_exec
            if ppid >= 0:
                proc.ppid = ppid
            _, det, windows[g], thresholds[g] = self._resolve(proc.name)
            procs.append(proc)
            dets.append(det)
        return _Segments(runs, procs, dets, windows, thresholds)

    @staticmethod
    def _name(cols: _Columns, lo: int, exec_row: int | None) -> tuple[str, str | None]:
        """The program and command line of a process that starts at row ``lo``."""
        comm = str(cols.comm[lo].as_py())
        if exec_row is None:
            return comm, None
        b = cols.calls
        path = b.paths[exec_row] if b.paths is not None else None
        argv = b.argvs[exec_row] if b.argvs is not None else None
        return program_name(comm, path, argv), argv

    def _advance(self, cols: _Columns, seg: _Segments, w: _Windows) -> tuple[np.ndarray, list[list[str]]]:
        """Fold the batch into each process's state; its trace score and evidence per segment."""
        now = time.monotonic()
        evidence: list[list[str]] = []
        scores = []
        k = w.k
        per_seg = zip(seg.procs, seg.dets, seg.runs.starts.tolist(), seg.runs.ends.tolist(), seg.windows.tolist(),
                      w.best.tolist(), w.totals.tolist(), w.top.tolist(), seg.thresholds.tolist(), strict=True)
        for g, (proc, det, lo, hi, win, best, total, top, threshold) in enumerate(per_seg):
            proc.best = max(proc.best, best)
            proc.total += total
            ev: list[str] = []
            if top > threshold and (top > 1.1 * proc.shown or now - proc.shown_at >= self.evidence_every):
                part = w.wmean[lo:hi]
                j = len(part) - 1 - int(np.argmax(part[::-1]))  # the latest of equally rare windows: more context
                size = int(min(win, proc.n + j + 1, EVIDENCE_CALLS))
                end = w.rowpos[lo + j] + 1
                ev = window_text(proc.raw, cols.calls, lo, j, w.padded[end - size:end])
                proc.shown, proc.shown_at = top, now
            proc.n += hi - lo
            proc.tail = w.new_tails[g, k - (win - 1):].copy() if win > 1 else np.zeros(0)
            if win > 1:
                proc.raw = cols.calls.tail(proc.raw, lo, hi, win - 1)
            scores.append(_trace_score(proc, det, win))
            evidence.append(ev)
        return np.array(scores), evidence


def _rows(cols: _Columns, seg: _Segments, w: _Windows, scores: np.ndarray, evidence: list[list[str]]) -> pa.Table:
    """The RESULT_SCHEMA rows of a batch, one per segment."""
    starts, procs = seg.runs.starts, seg.procs
    last = seg.runs.ends - 1
    comm = cols.comm.take(pa.array(last))
    return pa.table({
        "vm_id": pa.repeat(pa.scalar(cols.vm[0], pa.string()), len(starts)) if len(cols.vm) == 1
        else pa.array([cols.vm[c] for c in cols.vm_code[starts].tolist()], pa.string()),
        "pid": pa.array(cols.pid[starts].astype(np.int32)),
        "tgid": pa.array(cols.tgid[starts].astype(np.int32)),
        "ppid": pa.array([p.ppid for p in procs], pa.int32()),
        "comm": comm.combine_chunks() if isinstance(comm, pa.ChunkedArray) else comm,
        "name": pa.array([p.name for p in procs], pa.string()),
        "cmdline": pa.array([p.cmdline for p in procs], pa.string()),
        "program": pa.array([p.program for p in procs], pa.string()),
        "calls": pa.array(seg.lengths.astype(np.int64)),
        "total_calls": pa.array(np.array([p.n for p in procs], dtype=np.int64)),
        "windows_above": pa.array(w.above.astype(np.int64)),
        "max_window": pa.array(w.top.astype(np.float64)),
        "threshold": pa.array(seg.thresholds),
        "score": pa.array(scores),
        "first_seq": pa.array(cols.seq[starts]),
        "last_seq": pa.array(cols.seq[last]),
        "evidence": pa.array(evidence, pa.list_(pa.string())),
    }, schema=RESULT_SCHEMA)
