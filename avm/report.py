"""The integrity report: what the A-VM says about its VM every reporting interval.

A report is one JSON document, in exactly the shape REM-S checks (:mod:`vims.remote.protocol`,
:func:`~vims.remote.protocol.check_report`); the keys below ``behaviour``, ``events`` and
``collector`` beyond the ones REM-S needs are allowed and signed with the rest. ``vims avm run --json``
and ``vims avm replay --json`` print one per line (with REM-S, the very document sent to it)::

    {"vm_id": "vm-1", "avm_id": "avm-1",   # the stamp (vims.avm.stamp; with REM-S, its session's)
     "seq": 17,                     # per A-VM, from 1, strictly increasing
     "time": 1764240000.25,         # unix seconds when the report was made
     "nonce": null,                 # the REM-S nonce it answers (null without REM-S)
     "interval_s": 1.0,             # the reporting interval
     "policy_version": 3,           # the REM-S policy it was made under (null without REM-S)
     # the content (ReportBuilder.content):
     "measured_at": 1764240000.25,  # unix seconds when this interval's measurements closed
     "model": {"sha256": "9f2c...", "path": "model-set.skops"},  # the model file that scored
     "behaviour": {
        "score": 0.97,              # in [0, 1], 1 = entirely normal (definition below); null: nothing scored
        "threshold": 0.5,           # below it the A-VM calls the VM anomalous
        "anomalous": false,         # score < threshold (null with the score)
        "windows": 5120,            # windows closed in the last `horizon` intervals (one per scored call)
        "windows_above": 40,        # of which above their program's window threshold
        "processes": 12,            # processes that made calls in those intervals
        "horizon_s": 5.0,           # how far back the score looks: `horizon` x interval_s
        "top_processes": [          # the least normal processes of those intervals, worst first
           {"pid": 812, "tgid": 812, "comm": "exe",  # the kernel's name of the task
            "name": "sh",           # the program it runs (execve path, argv[0] for /proc/self/exe)
            "model": "sh",          # the model-set key that scored it ("*": the fallback)
            "ppid": 700, "parent": "exec.cgi",  # when the collector gives the parent
            "lineage": ["exec.cgi[700]", "httpd[312]", "init[1]"],  # parent, grandparent, ... as known
            "cmdline": "sh -c cat /etc/shadow",  # of the execve that started it, when known
            "score": 0.2,           # this process's own normality: 1 - its share of windows above
            "windows": 50, "windows_above": 40,
            "max_window": 0.85,     # its rarest window: mean surprise of `window` consecutive calls
            "threshold": 0.1,       # the window threshold of its program's model
            "trace_score": 0.31,    # its whole-trace anomaly so far (as batch scoring gives it)
            "unseen_start": null,   # why its start is out of line with the training data (then score 0)
            "evidence": ["40 of 50 windows above threshold 0.1 (model: sh)",
                         "command line: sh -c cat /etc/shadow",
                         "started by exec.cgi[700] <- httpd[312] <- init[1]",
                         "rarest window, mean surprise 0.85:",
                         "*openat /etc/shadow @0x4012a3", " read @0x4012c8", ...]}]},
     "checks": [{"check": "kernel-text", "target": "kernel text", "status": "pass", "detail": null,
                 "cost": "light", "ts_ns": 1764240000000000000}],   # latest result of every check
     "events": {"seen": 51200, "scored": 51200,  # since the agent started
                "dropped": 0,       # dropped and counted where they were dropped (a full queue)
                "missing": 0,       # lost without such a count: gaps in the collector's event seq,
                                    # batches lost on the way to or inside a scorer that died
                "interval": {"seen": 5120, "scored": 5120, "dropped": 0, "missing": 0}},
     "collector": {...,             # the collector's own health (tracer state, rate, its drops)
                   "alive": true,   # the source runs and delivered a batch within 2 intervals
                   "last_batch_age_s": 0.1,  # null before the first batch
                   "pipeline": {"workers": [...], "restarts": 0, "latency_p50_s": 0.004,
                                "latency_p99_s": 0.02, "result_gaps": 0}}}

Behaviour score
---------------
Every call a process makes closes a *window*: the mean per-call surprise of its last ``window`` calls
under the model of its program (:mod:`vims.avm.scoring`). A window is *above threshold* when that mean
exceeds the program's calibrated window threshold (the ``1 - far`` quantile of the windows of held-out
normal traces: :mod:`vims.training.per_program`), so on normal behaviour about ``far`` of the windows
are above it. (A single detector without a model set uses its own trace threshold.) A process's normality over
the last ``horizon`` reporting intervals (default 5) is ``1 - above / windows``. The VM's behaviour score
is the normality of its least normal process, among the processes that closed at least
``min_windows`` windows in those intervals (processes with fewer are pooled into one, so a burst of
short-lived processes counts as one):

    score = min over processes p of (1 - above_p / windows_p),  or null if no calls were scored

(missing data is never normal: with no scored window in the horizon, ``score`` and ``anomalous`` are
null and ``windows`` 0; REM-S refuses such a report's VM).

A process whose start the model set's lineage rules out
(:meth:`~vims.models.modelset.ModelSet.unseen_start`: what started it, by ``execve`` in its own task or
as its parent, ran a program that made many calls in training and never started a program; a web
server's PHP worker starting ``sh``) counts with normality 0 whatever its windows, listed first with
``unseen_start`` saying why: the sequence models see a web shell's ``sh`` and ``ps`` as an ordinary
shell and ``ps``, but no PHP worker of the training data ever started one.

One process behaving abnormally most of the time (a web server's shell reading ``/etc/shadow``) pulls
the score under the threshold (default 0.5: more than half of a process's windows are rare), however
much normal work the rest of the VM does; a scattering of rare windows across normal processes
does not. Processes evicted from a scorer's bounded state start afresh.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from vims.avm.stamp import LocalStamp
from vims.runs import program_at


@dataclass
class _Interval:
    """One process's part of the current interval."""

    tgid: int
    program: str
    comm: str = ""
    ppid: int | None = None
    cmdline: str | None = None
    windows: int = 0
    above: int = 0
    calls: int = 0
    max_window: float = float("-inf")
    threshold: float = 0.0
    trace_score: float = 0.0
    evidence: list[str] = field(default_factory=list)


class ReportBuilder:
    """Accumulate scorer results and make the content of integrity reports (:meth:`content`).

    The stamp (seq, time, nonce, ...) is not the builder's: :mod:`vims.avm.stamp` adds it.

    Parameters
    ----------
    vm_id, avm_id : str
        Who the reports are about and who makes them (for :meth:`report`).
    interval_s : float
        The reporting interval (recorded in each report).
    threshold : float
        Behaviour score under which the VM is called anomalous.
    min_windows : int
        Windows a process needs in an interval to be judged on its own (fewer: pooled).
    top : int
        Processes listed in ``top_processes`` at most.
    horizon : int
        Reporting intervals the behaviour score looks back over (an attack is not forgotten as soon as
        it goes quiet).
    keep_scores : int
        Latest trace scores kept (per process) for :meth:`trace_scores`.
    """

    def __init__(self, vm_id: str = "vm-1", avm_id: str = "avm-1", interval_s: float = 1.0,
                 threshold: float = 0.5, min_windows: int = 10, top: int = 5, horizon: int = 5,
                 keep_scores: int = 1_000_000) -> None:
        self.vm_id = vm_id
        self.avm_id = avm_id
        self.interval_s = interval_s
        #: ``{"sha256", "path"}`` of the model file that scores, carried by every report (None: not a file).
        self.model: dict[str, str] | None = None
        #: ``(parent program, program) -> reason or None``: a start the model's training never saw the
        #: like of (:meth:`vims.models.modelset.ModelSet.unseen_start`); None: no lineage is judged.
        self.lineage: Callable[[str, str], str | None] | None = None
        self.threshold = threshold
        self.min_windows = min_windows
        self.top = top
        self.horizon = horizon
        self.keep_scores = keep_scores
        self._recent: deque[dict[tuple[int, str], _Interval]] = deque(maxlen=max(1, horizon))
        self.checks: dict[tuple[str, str], dict[str, Any]] = {}
        self._interval: dict[tuple[int, str], _Interval] = {}
        self._scores: OrderedDict[tuple[int, str], tuple[float, int, str]] = OrderedDict()
        self._last_counts: dict[str, int] = {}
        self._names: OrderedDict[int, tuple[str, int | None]] = OrderedDict()  # pid -> (program, ppid)
        self._starters: OrderedDict[tuple[int, str], str] = OrderedDict()  # (pid, program) -> the one it replaced
        self._began: OrderedDict[tuple[int, str], int] = OrderedDict()  # (pid, program) -> seq of its first event
        self._runs: OrderedDict[int, tuple[list[int], list[str]]] = OrderedDict()  # pid -> its programs, from seq
        self._lock = threading.Lock()
        self._stamp = LocalStamp(vm_id, avm_id, lambda: self.interval_s)  # report()'s, not an agent's

    # -- input ----------------------------------------------------------------------------------------
    def add(self, result: pa.Table, meta: Mapping[str, str] | None = None) -> None:
        """Take one scorer result table (:data:`vims.avm.scoring.RESULT_SCHEMA`)."""
        if result.num_rows == 0:
            return
        cols = result.to_pydict()
        with self._lock:
            for i in range(result.num_rows):
                key = (cols["pid"][i], cols["name"][i])
                p = self._interval.get(key)
                if p is None:
                    p = self._interval[key] = _Interval(cols["tgid"][i], cols["program"][i])
                ppid = self._parent(cols["pid"][i], cols["name"][i], cols["ppid"][i])
                self._began.setdefault(key, cols["first_seq"][i])
                self._ran(cols["pid"][i], cols["name"][i], cols["first_seq"][i])
                before = self._names.get(cols["pid"][i])
                if before is not None and before[0] != cols["name"][i] and cols["cmdline"][i] is not None:
                    self._starters[key] = before[0]  # an execve put this program in place of that one
                p.comm, p.ppid, p.cmdline = cols["comm"][i], ppid, cols["cmdline"][i]
                self._names[cols["pid"][i]] = (cols["name"][i], ppid)
                self._names.move_to_end(cols["pid"][i])
                p.calls += cols["calls"][i]
                p.windows += cols["calls"][i]
                p.above += cols["windows_above"][i]
                p.threshold = cols["threshold"][i]
                p.trace_score = cols["score"][i]
                if cols["max_window"][i] > p.max_window:
                    p.max_window = cols["max_window"][i]
                    if cols["evidence"][i]:
                        p.evidence = cols["evidence"][i]
                self._scores[key] = (cols["score"][i], cols["total_calls"][i], cols["program"][i])
                self._scores.move_to_end(key)
            while len(self._scores) > self.keep_scores:
                self._scores.popitem(last=False)
            while len(self._names) > 65536:
                self._names.popitem(last=False)
            for kept in (self._starters, self._began, self._runs):
                while len(kept) > 65536:
                    kept.popitem(last=False)

    def _ran(self, pid: int, name: str, first_seq: int) -> None:
        """Note that task ``pid`` runs ``name`` from event ``first_seq`` on (its program runs, for
        :func:`~vims.runs.program_at`); a seq lower than the last one known starts the pid afresh
        (a new collector session numbers its events from 0 again)."""
        runs = self._runs.get(pid)
        if runs is None or first_seq < runs[0][-1]:
            runs = self._runs[pid] = ([], [])
        self._runs.move_to_end(pid)
        if not runs[1] or runs[1][-1] != name:
            runs[0].append(first_seq)
            runs[1].append(name)
            if len(runs[0]) > 64:  # a task that runs one program after another: its first ones are old news
                del runs[0][0], runs[1][0]

    def _parent(self, pid: int, name: str, ppid: int | None) -> int | None:
        """The parent a process is reported with: the one that started it.

        When its parent ends, the kernel hands a process to init (pid 1), and the collector then reads
        1 as its parent: a listener a web shell started in the background names init from then on. The
        parent it was first seen with (same pid, same program) is kept instead, so that the report's
        "started by" stays the ancestry that started it. A process only ever seen after its parent ended
        names init: that ancestry is gone from the guest too.
        """
        if ppid == 1:
            known = self._names.get(pid)
            if known is not None and known[0] == name and known[1] is not None and known[1] > 1:
                return known[1]
        return ppid

    def _starts(self, interval: Mapping[tuple[int, str], _Interval]) -> dict[tuple[int, str], str]:
        """What started each process of ``interval`` (the lock held), as the capture importer names a
        trace's ``parent``: the program its task ran before an ``execve`` put it in place, else the
        program its parent ran when it began (:func:`~vims.runs.program_at`): a shell's fork is
        started by the shell, also once the shell has run its last command in its own task."""
        out = {}
        for key, p in interval.items():
            starter = self._starters.get(key)
            runs = self._runs.get(p.ppid) if starter is None and p.ppid is not None else None
            if runs is not None:
                starter = program_at(runs[0], runs[1], self._began.get(key, runs[0][-1] + 1))
            if starter is not None:
                out[key] = starter
        return out

    def _unseen_starts(self, interval: Mapping[tuple[int, str], _Interval],
                       starters: Mapping[tuple[int, str], str]) -> dict[tuple[int, str], str]:
        """The processes of ``interval`` whose start the model's lineage rules out, with the reason
        (``starters``: what started each, :meth:`_starts`)."""
        if self.lineage is None:
            return {}
        out = {}
        for (pid, name) in interval:
            starter = starters.get((pid, name))
            reason = self.lineage(starter, name) if starter is not None else None
            if reason is not None:
                out[(pid, name)] = reason
        return out

    def set_checks(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Record static check results (CHECK_SCHEMA rows); the latest per (check, target) is reported."""
        with self._lock:
            for r in rows:
                row: dict[str, Any] = {"check": str(r["check"]), "target": str(r["target"]),
                                       "status": str(r["status"]),
                       "detail": None if r.get("detail") is None else str(r["detail"])}
                for extra in ("cost", "ts_ns"):
                    if r.get(extra) is not None:
                        row[extra] = r[extra] if extra != "ts_ns" else int(r[extra])
                self.checks[(str(r["check"]), str(r["target"]))] = row

    def trace_scores(self) -> dict[tuple[int, str], tuple[float, int, str]]:
        """The latest ``(trace score, calls, model key)`` of every process seen, by ``(pid, program name)``."""
        with self._lock:
            return dict(self._scores)

    # -- output ---------------------------------------------------------------------------------------
    def behaviour(self) -> dict[str, Any]:
        """The behaviour part of a report from the last ``horizon`` intervals; starts a new interval."""
        with self._lock:
            current, self._interval = self._interval, {}
        self._recent.append(current)
        interval = _merge(self._recent)
        windows = sum(p.windows for p in interval.values())
        above = sum(p.above for p in interval.values())
        groups = [(1.0 - p.above / p.windows) for p in interval.values() if p.windows >= self.min_windows]
        short = [p for p in interval.values() if 0 < p.windows < self.min_windows]
        if short:
            groups.append(1.0 - sum(p.above for p in short) / sum(p.windows for p in short))
        with self._lock:
            names, starters = dict(self._names), self._starts(interval)
        unseen = self._unseen_starts(interval, starters)
        if unseen:
            groups.append(0.0)
        score = min(groups) if groups else None  # no scored windows: no evidence, never "normal"

        def normality(key: tuple[int, str], p: _Interval) -> float:
            return 0.0 if key in unseen else 1.0 - p.above / p.windows

        # least normal first; among equals, the one with more rare windows (more evidence) first
        ranked = sorted(((k, p) for k, p in interval.items() if p.above > 0 or k in unseen),
                        key=lambda kp: (normality(*kp), -kp[1].above))
        top = []
        for (pid, name), p in ranked[:self.top]:
            evidence = [f"{p.above} of {p.windows} windows above threshold {p.threshold:.3g} (model: {p.program})"]
            if (pid, name) in unseen:
                evidence.insert(0, f"started out of line: {unseen[(pid, name)]}")
            lineage = _lineage(names, p.ppid)
            parent = lineage[0][0] if lineage else None
            if p.cmdline:
                evidence.append(f"command line: {p.cmdline}")
            if p.ppid is not None:
                evidence.append("started by " + " <- ".join(f"{n or '?'}[{q}]" for n, q in lineage))
            if p.evidence:
                evidence.append(f"rarest window, mean surprise {p.max_window:.3g}:")
                evidence.extend(p.evidence)
            top.append({"pid": int(pid), "tgid": int(p.tgid), "comm": p.comm, "name": name, "model": p.program,
                        "ppid": p.ppid, "parent": parent, "cmdline": p.cmdline,
                        "lineage": [f"{n or '?'}[{q}]" for n, q in lineage],
                        "score": round(normality((pid, name), p), 6), "windows": p.windows,
                        "unseen_start": unseen.get((pid, name)),
                        "windows_above": p.above, "max_window": round(p.max_window, 6),
                        "threshold": p.threshold, "trace_score": round(p.trace_score, 6), "evidence": evidence})
        return {"score": None if score is None else round(score, 6), "threshold": self.threshold,
                "anomalous": None if score is None else score < self.threshold,
                "horizon_s": round(self.horizon * self.interval_s, 6),
                "windows": windows, "windows_above": above, "processes": len(interval), "top_processes": top}

    def content(self, counts: Mapping[str, Any], collector: Mapping[str, Any] | None = None,
                latency: Mapping[str, float | None] | None = None) -> dict[str, Any]:
        """A report's content (everything but its stamp, :mod:`vims.avm.stamp`); starts a new interval.

        ``counts`` is :meth:`vims.avm.pipeline.Pipeline.counts`; ``collector`` the collector's health
        (its ``dropped`` events are added to the events dropped).
        """
        collector = dict(collector or {})
        totals = {"seen": int(counts.get("seen", 0)), "scored": int(counts.get("scored", 0)),
                  "dropped": int(counts.get("dropped", 0)) + int(collector.get("dropped", 0) or 0),
                  "missing": int(counts.get("missing", 0))}
        interval = {k: v - self._last_counts.get(k, 0) for k, v in totals.items()}
        self._last_counts = totals
        latency = latency or {}
        collector["pipeline"] = {"workers": counts.get("workers", []), "restarts": counts.get("restarts", 0),
                                 "latency_p50_s": latency.get("p50"), "latency_p99_s": latency.get("p99"),
                                 "result_gaps": counts.get("result_gaps", 0),
                                 "missing_seq_gaps": counts.get("missing_seq_gaps", 0)}
        with self._lock:
            checks = sorted(self.checks.values(), key=lambda c: (c["check"], c["target"]))
        content: dict[str, Any] = {"measured_at": time.time(), "behaviour": self.behaviour(), "checks": checks,
                                   "events": {**totals, "interval": interval}, "collector": collector}
        if self.model is not None:
            content["model"] = dict(self.model)
        return content

    def report(self, counts: Mapping[str, Any], collector: Mapping[str, Any] | None = None,
               latency: Mapping[str, float | None] | None = None) -> dict[str, Any]:
        """:meth:`content` with a local stamp of this builder's own (a builder used without an agent)."""
        return self._stamp(self.content(counts, collector, latency))  # measured first: measured_at <= time


def _merge(intervals: Iterable[dict[tuple[int, str], _Interval]]) -> dict[tuple[int, str], _Interval]:
    """Per process, its windows over several intervals (oldest first): counts add up, the rarest window
    and its evidence are kept, the rest is the latest."""
    out: dict[tuple[int, str], _Interval] = {}
    for interval in intervals:
        for key, p in interval.items():
            q = out.get(key)
            if q is None:
                out[key] = replace(p, evidence=list(p.evidence))
                continue
            q.windows += p.windows
            q.above += p.above
            q.calls += p.calls
            q.tgid, q.program, q.comm, q.ppid, q.cmdline = p.tgid, p.program, p.comm, p.ppid, p.cmdline
            q.threshold, q.trace_score = p.threshold, p.trace_score
            if p.max_window > q.max_window:
                q.max_window = p.max_window
                if p.evidence:
                    q.evidence = list(p.evidence)
    return out


def _lineage(names: Mapping[int, tuple[str, int | None]], ppid: int | None,
             depth: int = 8) -> list[tuple[str | None, int]]:
    """``[(name, pid), ...]`` of a process's parent, its parent's parent, ... as far as they are known.

    >>> _lineage({5: ("sh", 4), 4: ("httpd", 1)}, 5)
    [('sh', 5), ('httpd', 4), (None, 1)]
    """
    out: list[tuple[str | None, int]] = []
    seen = set()
    while ppid is not None and ppid not in seen and len(out) < depth:
        seen.add(ppid)
        name, parent = names.get(ppid, (None, None))
        out.append((name, ppid))
        ppid = parent if parent is not None and parent > 0 else None
    return out


def summary_line(report: Mapping[str, Any]) -> str:
    """One line for a person: the score, the worst processes, the counts.

    >>> summary_line({"seq": 3, "behaviour": {"score": 0.2, "threshold": 0.5, "top_processes": [
    ...     {"pid": 9, "comm": "sh", "score": 0.2}]}, "events": {"seen": 10, "dropped": 1, "missing": 0},
    ...     "checks": [{"status": "pass"}]})
    '#3 behaviour 0.20 < 0.5 ANOMALOUS | sh[9] 0.20 | checks 1 pass | events 10 seen, 1 dropped, 0 missing'
    """
    b = report["behaviour"]
    if b["score"] is None:
        verdict, sign, shown = "NO DATA", "?", "-"
    else:
        verdict = "ANOMALOUS" if b["score"] < b["threshold"] else "normal"
        sign = "<" if b["score"] < b["threshold"] else ">="
        shown = f"{b['score']:.2f}"
    top = ", ".join(f"{p.get('name', p['comm'])}[{p['pid']}] {p['score']:.2f}"
                    for p in b.get("top_processes", [])[:3]) or "-"
    checks = report.get("checks", [])
    failed = [c for c in checks if c.get("status") != "pass"]
    chk = f"{len(checks) - len(failed)} pass" + (f", {len(failed)} FAIL" if failed else "")
    ev = report["events"]
    return (f"#{report['seq']} behaviour {shown} {sign} {b['threshold']:g} {verdict} | {top} | "
            f"checks {chk} | events {ev['seen']} seen, {ev['dropped']} dropped, {ev['missing']} missing")
