"""The A-VM agent: a pipeline, a report builder, the collector feeding them, and where reports go.

:class:`Agent` owns a :class:`~vims.avm.pipeline.Pipeline` (scorer workers) and a
:class:`~vims.avm.report.ReportBuilder`. Sources call :meth:`Agent.send` with event batches (never
blocks) and :meth:`Agent.set_checks` with check rows; :meth:`Agent.tick` makes a report when the
interval is over and hands it to every sink (print, file, REM-S). :func:`ingest` is the source for a
collector in another process (``vims collect --push``): a PULL socket whose ``event`` batches go to
the pipeline and whose ``check`` batches go to the report.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from vims.avm.pipeline import Pipeline
from vims.avm.report import SESSION_KEYS, ReportBuilder

Report = dict[str, Any]


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
        self.pipeline = Pipeline(model, workers=workers, on_result=self.builder.add, **pipeline)
        self.interval_s = interval_s
        self.sinks: list[Callable[[Report], None]] = []
        self.collector_health: Callable[[], dict[str, Any]] = dict
        self.last: Report | None = None
        self.nonce: str | None = None
        self.policy_version: int | None = None
        #: The running tracer, when the agent traces the guest itself (REM-S's tracing policy goes to it).
        self.tracer: Any = None
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
        """Make a report now (closing the current interval) and hand it to the sinks."""
        with self._report_lock:
            try:
                health = dict(self.collector_health())
            except Exception as exc:  # a broken health probe must not stop reporting
                health = {"state": "unknown", "error": f"{type(exc).__name__}: {exc}"}
            report = self.builder.report(self.pipeline.counts(), health, self.pipeline.latency_quantiles(),
                                         nonce=nonce if nonce is not None else self.nonce,
                                         policy_version=self.policy_version)
            self.last = report
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


def content_of(report: Report) -> Report:
    """The part of a report that REM-S's client sends (it fills in :data:`SESSION_KEYS` itself)."""
    return {k: v for k, v in report.items() if k not in SESSION_KEYS}


class RemoteSink:
    """Send every report to REM-S through :class:`vims.remote.client.AvmClient`, answer nonce requests.

    The policy REM-S sends sets the agent's reporting interval (``interval_s``) and threshold
    (``threshold``) when it names them.
    """

    def __init__(self, agent: Agent, client: Any) -> None:
        self.agent = agent
        self.client = client
        client.on_event = self.on_event

    def __call__(self, report: Report) -> None:
        self.client.send_report(content_of(report))

    def on_event(self, kind: str, body: dict[str, Any]) -> None:
        if kind == "policy":
            policy = body.get("policy") or {}
            if isinstance(policy.get("interval_s"), int | float) and policy["interval_s"] > 0:
                self.agent.set_interval(policy["interval_s"])
            if isinstance(policy.get("threshold"), int | float):
                self.agent.builder.threshold = float(policy["threshold"])
            self.agent.policy_version = body.get("version")
            if isinstance(policy.get("tracing"), dict) and self.agent.tracer is not None:
                from vims.collector.policy import Policy

                # REM-S validated it with the same parser; a bad one raises here and the client counts it.
                self.agent.tracer.set_policy(Policy.from_dict(policy["tracing"], where="REM-S policy: tracing"))
            self.agent.nonce = body.get("nonce") or self.agent.nonce
        elif kind == "ack":
            self.agent.nonce = body.get("nonce") or self.agent.nonce
        elif kind == "nonce":
            # Answer at once with the latest full interval's findings (a fresh interval would be too short
            # to judge), carrying the nonce asked for.
            last = self.agent.last
            if last is None:
                last = self.agent.report()
            self.client.send_report(content_of(last), nonce=body.get("nonce"))


def ingest(agent: Agent, endpoint: str, stop: threading.Event, secret_key: str | None = None) -> dict[str, Any]:
    """Receive a remote collector's batches at ``endpoint`` until ``stop``; returns the receiver's counts.

    ``event`` batches go to the pipeline, ``check`` batches to the report. Sets the agent's collector
    health to the receiver's view (senders, gaps, the senders' own drops).
    """
    from vims.collector.stream import BatchReceiver

    rx = BatchReceiver(endpoint, secret_key=secret_key)
    state: dict[str, Any] = {"state": "listening", "endpoint": rx.endpoint, "batches": 0}

    def health() -> dict[str, Any]:
        senders = rx.stats()
        return {**state, "senders": senders, "gaps": rx.gaps, "rejected": rx.rejected,
                "dropped": sum(s["dropped_rows"] for s in senders.values())}

    agent.collector_health = health
    try:
        while not stop.is_set():
            msg = rx.recv(timeout=0.1)
            if msg is None:
                continue
            state["batches"] += 1
            state["state"] = "receiving"
            if msg.kind == "check":
                agent.set_checks(msg.batch)
            else:
                agent.send(msg.batch)
    finally:
        rx.close()
    return health()


def trace_guest(agent: Agent, guest: Any, stop: threading.Event, policy: Any = None, vm_id: str | None = None,
                checks_every: float | None = 10.0, deep_checks: bool = False, batch_ms: int = 100,
                method: str = "auto", on_ready: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Trace ``guest`` (a running :class:`vims.collector.guest.Guest`, or the name of one started by
    ``vims guest up``) into the agent until ``stop``; run the static checks every ``checks_every`` s.

    The tracer hands its batches to :meth:`Agent.send`, which never blocks it. The agent's collector
    health is the tracer's own counts (events, filtered, capped, unreadable...) and state. Returns the
    tracer's final counts and why it ended.
    """
    from vims.collector.gdbstub import GdbStub
    from vims.collector.guest import Guest
    from vims.collector.kernel import KernelView
    from vims.collector.memory import PhysicalMemory
    from vims.collector.tracer import SyscallTracer
    from vims.errors import VimsError

    if isinstance(guest, str):
        guest = Guest.attach(guest)
    if not guest.running:
        raise VimsError(f"the guest is not running (QEMU pid {guest.pid} is gone): `vims guest up`")
    state: dict[str, Any] = {"state": "starting", "collector": "gdbstub"}
    tracer: Any = None

    def health() -> dict[str, Any]:
        out = dict(state)
        if tracer is not None:
            out.update({"method": tracer.method, "notes": tracer.notes[-3:], **{
                k: v for k, v in tracer.stats.items() if isinstance(v, int | float | str | bool)}})
        return out

    agent.collector_health = health
    checker = None
    if checks_every is not None:
        checker = threading.Thread(target=_check_loop, args=(agent, guest, stop, checks_every, deep_checks, state),
                                   name="vims-checks", daemon=True)
        checker.start()
    memory = PhysicalMemory.open(guest.memory_path)
    try:
        view = KernelView(memory, guest.profile)
        with GdbStub(*guest.gdb_address) as gdb:
            tracer = SyscallTracer(gdb, view, vm_id or agent.builder.vm_id, policy=policy, method=method,
                                   batch_ms=batch_ms, on_batch=agent.send, keep=False)
            agent.tracer = tracer
            state["state"] = "tracing"
            if on_ready is not None:
                on_ready()
            try:
                result = tracer.run(stop=stop)
            finally:
                agent.tracer = None
            state["state"] = f"ended: {result.reason}"
            state["reason"] = result.reason
    finally:
        memory.close()
        if checker is not None:
            stop.set()
            checker.join(timeout=30)
    return health()


def _check_loop(agent: Agent, guest: Any, stop: threading.Event, every: float, deep: bool,
                state: dict[str, Any]) -> None:
    """Run the static checks against ``guest`` every ``every`` seconds until ``stop``."""
    from pathlib import Path

    from vims.collector.checks.base import Context, Reference, run_checks, select
    from vims.collector.guest import GuestImage
    from vims.collector.kernel import KernelView
    from vims.collector.memory import PhysicalMemory

    try:
        image = GuestImage.at(Path(guest.state["kernel"]).parent)
        memory = PhysicalMemory.open(guest.memory_path)
        ctx = Context(KernelView(memory, guest.profile), Reference.from_image(image), cpu=guest.state.get("cpu"))
    except Exception as exc:  # no checks is reported, not fatal: behaviour still counts
        state["checks"] = f"cannot run: {type(exc).__name__}: {exc}"
        return
    try:
        checks = select(deep=deep)
        while not stop.is_set():
            start = time.monotonic()
            try:
                rows = run_checks(ctx, checks)
                agent.set_checks([r.as_dict() for r in rows])
                state["checks"] = f"{len(rows)} rows in {time.monotonic() - start:.2f} s"
            except Exception as exc:  # a check that breaks is an error row, and the loop goes on
                agent.set_checks([{"check": "checks", "target": "guest", "status": "error",
                                   "detail": f"{type(exc).__name__}: {exc}"}])
            stop.wait(every)
    finally:
        memory.close()
