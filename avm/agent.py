"""The A-VM agent: a pipeline, a report builder, the collector feeding them, and where reports go.

:class:`Agent` owns a :class:`~vims.avm.pipeline.Pipeline` (scorer workers) and a
:class:`~vims.avm.report.ReportBuilder`. Sources call :meth:`Agent.send` with event batches (never
blocks) and :meth:`Agent.set_checks` with check rows; :meth:`Agent.tick` makes a report when the
interval is over: the builder's content, stamped once by :attr:`Agent.stamp`, goes to every sink (print,
file, the demo's timeline). The sources are :func:`vims.avm.ingest.ingest` (a collector in another process)
and :func:`vims.avm.guest_source.trace_guest` (the agent traces the guest itself);
:class:`vims.avm.remote_sink.RemoteSink` becomes the stamp with REM-S: its session stamps, signs and sends
each report, and the sinks see the document it sent.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from vims.avm.pipeline import Pipeline, load_model_any
from vims.avm.report import ReportBuilder
from vims.avm.stamp import LocalStamp, Report, Stamp


def model_digest(model: Any) -> dict[str, str] | None:
    """``{"sha256": hex digest of the model file's bytes, "path": its file name}``; None for a fitted model.

    Parameters
    ----------
    model : str, Path or fitted model
        What :class:`Agent` was given.
    """
    if not isinstance(model, str | Path):
        return None
    path = Path(model)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "path": path.name}


class Agent:
    """Scorer workers + aggregator + reports.

    Parameters
    ----------
    model : str, Path or fitted model
        Model file or model-set file (loaded safely), or a fitted detector / model set.
    vm_id, avm_id : str
        Carried by every report.
    workers : int
        Scorer worker processes.
    interval_s : float
        Reporting interval.
    threshold : float
        Behaviour score threshold (see :mod:`vims.avm.report`).
    min_windows, top, horizon : int
        See :class:`~vims.avm.report.ReportBuilder`.
    **pipeline : Any
        Passed to :class:`~vims.avm.pipeline.Pipeline` (``queue_size``, ``hwm``, ``window``, ...).
    """

    def __init__(self, model: Any, vm_id: str = "vm-1", avm_id: str = "avm-1", workers: int = 2,
                 interval_s: float = 1.0, threshold: float = 0.5, min_windows: int = 10, top: int = 5,
                 horizon: int = 5, **pipeline: Any) -> None:
        self.builder = ReportBuilder(vm_id, avm_id, interval_s, threshold, min_windows, top, horizon)
        self.builder.model = model_digest(model)
        #: The fitted model, loaded once in this process (the scorer workers load their own).
        self.model = load_model_any(model)
        # A model set's lineage judges process starts, in the builder, which sees every worker's processes.
        self.builder.lineage = getattr(self.model, "unseen_start", None)
        self.pipeline = Pipeline(model, workers=workers, on_result=self.builder.add, **pipeline)
        self.interval_s = interval_s
        self.sinks: list[Callable[[Report], None]] = []
        self.collector_health: Callable[[], dict[str, Any]] = dict
        #: Adds seq, time, nonce, ... to each report's content (REM-S's session with a RemoteSink).
        self.stamp: Stamp = LocalStamp(vm_id, avm_id, lambda: self.interval_s)
        #: The latest report, and its content (what a nonce request is answered with).
        self.last: Report | None = None
        self.last_content: Report | None = None
        #: The running tracer, when the agent traces the guest itself (REM-S's tracing policy goes to it).
        self.tracer: Any = None
        #: REM-S's static checks to run, ``[{"check", "every_s"}]`` (None: the A-VM's own default).
        self.check_plan: list[dict[str, Any]] | None = None
        self._next = 0.0
        self._report_lock = threading.Lock()

    def start(self, wait: float = 60.0) -> Agent:
        self.pipeline.start(wait)
        self._next = time.monotonic() + self.interval_s
        return self

    def close(self, drain: float = 0.0) -> None:
        self.pipeline.close(drain)

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, events: pa.Table | pa.RecordBatch, wait: float = 0.0) -> bool:
        """Hand an event batch to the pipeline (never blocks with ``wait`` 0)."""
        return self.pipeline.send(events, wait)

    def set_checks(self, rows: Any) -> None:
        """Record static check results: CHECK_SCHEMA rows (a table or dicts)."""
        if isinstance(rows, pa.Table | pa.RecordBatch):
            rows = rows.to_pylist()
        self.builder.set_checks(rows)

    def set_interval(self, interval_s: float) -> None:
        self.interval_s = self.builder.interval_s = float(interval_s)

    def report(self, nonce: str | None = None) -> Report:
        """Make a report now (closing the current interval), stamp it and hand it to the sinks."""
        with self._report_lock:
            try:
                health = dict(self.collector_health())
            except Exception as exc:  # a broken health probe must not stop reporting
                health = {"state": "unknown", "error": f"{type(exc).__name__}: {exc}"}
            content = self.builder.content(self.pipeline.counts(), health, self.pipeline.latency_quantiles())
            report = self.stamp(content, nonce)
            self.last, self.last_content = report, content
            self._next = time.monotonic() + self.interval_s
        for sink in self.sinks:
            sink(report)
        return report

    def tick(self) -> Report | None:
        """Make a report if the interval is over."""
        if time.monotonic() >= self._next:
            return self.report()
        return None

    def run(self, duration: float | None = None, stop: threading.Event | None = None) -> None:
        """Report every interval until ``duration`` s have passed or ``stop`` is set."""
        stop = stop or threading.Event()
        end = None if duration is None else time.monotonic() + duration
        while not stop.is_set():
            now = time.monotonic()
            if end is not None and now >= end:
                return
            wait = self._next - now
            if end is not None:
                wait = min(wait, end - now)
            if wait > 0:
                stop.wait(wait)
                continue
            self.report()
