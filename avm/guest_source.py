"""The agent's source when it traces the guest itself: the tracer in a thread, the checks loop beside it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from vims.avm.agent import Agent
from vims.avm.checks_loop import check_loop
from vims.avm.health import liveness


def trace_guest(agent: Agent, guest: Any, stop: threading.Event, policy: Any = None, vm_id: str | None = None,
                checks_every: float | None = 10.0, deep_checks: bool = False, batch_ms: int = 100,
                method: str = "auto", on_ready: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Trace ``guest`` (a running :class:`vims.collector.guest.Guest`, or the name of one started by
    ``vims guest up``) into the agent until ``stop``; run the static checks every ``checks_every`` s.

    The tracer hands its batches to :meth:`Agent.send`, which never blocks it. The agent's collector
    health is the tracer's own counts (events, filtered, capped, unreadable...) and state. Returns the
    tracer's final counts and why it ended.
    """
    from vims.collector.backends import QemuBackend
    from vims.collector.tracer import SyscallTracer

    backend = QemuBackend.from_guest(guest)  # a Guest or the name of one; a clear error if it is not running
    guest = backend.guest
    state: dict[str, Any] = {"state": "starting", "collector": "gdbstub"}
    tracer: Any = None
    last: list[float] = []

    def health() -> dict[str, Any]:
        out = dict(state)
        if tracer is not None:
            out.update({"method": tracer.method, "notes": tracer.notes[-3:], **{
                k: v for k, v in tracer.stats.items() if isinstance(v, int | float | str | bool)}})
        return {**out, **liveness(state["state"] == "tracing", last, agent.interval_s)}

    def deliver(batch: Any) -> bool:
        last[:] = [time.monotonic()]
        return agent.send(batch)

    agent.collector_health = health
    checker = None
    if checks_every is not None:
        checker = threading.Thread(target=check_loop, args=(agent, guest, stop, checks_every, deep_checks, state),
                                   name="vims-checks", daemon=True)
        checker.start()
    try:
        tracer = SyscallTracer(backend, vm_id or agent.builder.vm_id, policy=policy, method=method,
                               batch_ms=batch_ms, on_batch=deliver, keep=False)
        agent.tracer = tracer
        state["state"] = "tracing"
        if on_ready is not None:
            on_ready()
        try:
            result = tracer.run(stop=stop)
        except BaseException as exc:
            state["state"] = f"failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            agent.tracer = None
        state["state"] = f"ended: {result.reason}"
        state["reason"] = result.reason
    finally:
        backend.close()
        if checker is not None:
            stop.set()
            checker.join(timeout=30)
    return health()
