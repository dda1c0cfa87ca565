"""The agent's source when it traces the guest itself: the tracer in a thread, the checks loop beside it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from vims.avm.agent import Agent
from vims.avm.checks_loop import check_loop
from vims.avm.health import liveness
from vims.collector.kaslr import at_clock_pace
from vims.errors import VimsError

#: Seconds between two looks at whether the guest's kernel is still the one traced.
REBOOT_WATCH_S = 2.0
#: Seconds the traced kernel's clock must stand still, with no running kernel found elsewhere, before
#: the watcher calls it a reboot (a new kernel found elsewhere, or a clock that leaps, is one at once).
STILL_S = 30.0


def trace_guest(agent: Agent, guest: Any, stop: threading.Event, policy: Any = None, vm_id: str | None = None,
                checks_every: float | None = 10.0, deep_checks: bool = False, batch_ms: int = 100,
                method: str = "auto", on_ready: Callable[[], Any] | None = None,
                watch_every: float = REBOOT_WATCH_S) -> dict[str, Any]:
    """Trace ``guest`` (a running :class:`vims.collector.guest.Guest`, or the name of one started by
    ``vims guest up``) into the agent until ``stop``; run the static checks every ``checks_every`` s.

    The tracer hands its batches to :meth:`Agent.send`, which never blocks it. The agent's collector
    health is the tracer's own counts (events, filtered, capped, unreadable...) and state. When the
    guest reboots in place (its kernel comes back elsewhere: KASLR), the tracer's traps point at the
    old kernel and would see nothing: a watcher notices the new boot every ``watch_every`` seconds,
    the tracer ends, and a new one attaches to the new kernel (state ``rebooting`` meanwhile, which
    the liveness in every report shows as not tracing). Returns the tracer's final counts and why it
    ended.
    """
    from vims.collector.backends import QemuBackend

    backend = QemuBackend.from_guest(guest)  # a Guest or the name of one; a clear error if it is not running
    guest = backend.guest
    state: dict[str, Any] = {"state": "starting", "collector": "gdbstub", "reboots": 0}
    current: dict[str, Any] = {"tracer": None}
    last: list[float] = []

    def health() -> dict[str, Any]:
        out = dict(state)
        tracer = current["tracer"]
        if tracer is not None:
            out.update({"method": tracer.method, "notes": tracer.notes[-3:], **{
                k: v for k, v in tracer.stats.items() if isinstance(v, int | float | str | bool)}})
        return {**out, **liveness(state["state"] == "tracing", last, agent.interval_s)}

    def deliver(batch: Any) -> bool:
        last[:] = [time.monotonic()]
        return agent.send(batch)

    def traced_kernel() -> Any:  # the checks look at the kernel the tracer traces (None: rebooting)
        return None if state["state"] == "rebooting" else current["backend"].profile

    agent.collector_health = health
    current["backend"] = backend
    checker = None
    if checks_every is not None:
        checker = threading.Thread(target=check_loop, args=(agent, guest, stop, checks_every, deep_checks, state,
                                                            traced_kernel), name="vims-checks", daemon=True)
        checker.start()
    try:
        while True:
            rebooted = _trace_one_boot(agent, backend, stop, current, state, deliver, watch_every,
                                       dict(policy=policy, vm_id=vm_id, method=method, batch_ms=batch_ms),
                                       on_ready)
            on_ready = None
            if not rebooted or stop.is_set():
                break
            backend.close()
            state["state"], state["reboots"] = "rebooting", state["reboots"] + 1
            attached = _attach_new_boot(guest, stop, watch_every)
            if attached is None:
                break
            backend = current["backend"] = attached
    finally:
        backend.close()
        if checker is not None:
            stop.set()
            checker.join(timeout=30)
    return health()


def _trace_one_boot(agent: Agent, backend: Any, stop: threading.Event, current: dict[str, Any],
                    state: dict[str, Any], deliver: Callable[[Any], bool], watch_every: float,
                    knobs: dict[str, Any], on_ready: Callable[[], Any] | None) -> bool:
    """Trace the kernel ``backend`` was made for until ``stop`` or a new boot; whether it rebooted."""
    from vims.collector.tracer import SyscallTracer

    ended = threading.Event()  # the tracer's own stop: the agent's stop, or a new boot
    reboot = threading.Event()
    watcher = threading.Thread(target=_watch_boot, args=(backend, stop, ended, reboot, watch_every, state),
                               name="vims-boot-watch", daemon=True)
    tracer: Any
    plugin = knobs["method"] == "plugin" or (knobs["method"] == "auto"
                                             and getattr(backend.guest, "plugin_shm", None) is not None)
    if plugin:  # a guest started with the QEMU syscall plugin: every call, from its rings
        from vims.collector.plugin_tracer import PluginTracer

        tracer = PluginTracer(backend, knobs["vm_id"] or agent.builder.vm_id, policy=knobs["policy"],
                              batch_ms=knobs["batch_ms"], on_batch=deliver, keep=False)
    else:
        tracer = SyscallTracer(backend, knobs["vm_id"] or agent.builder.vm_id, policy=knobs["policy"],
                               method=knobs["method"], batch_ms=knobs["batch_ms"], on_batch=deliver, keep=False)
    current["tracer"] = agent.tracer = tracer
    state["state"] = "tracing"
    watcher.start()
    if on_ready is not None:
        on_ready()
    try:
        result = tracer.run(stop=ended)
    except BaseException as exc:
        state["state"] = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        agent.tracer = None
        ended.set()
        watcher.join(timeout=30)
    if not reboot.is_set():
        state["state"] = f"ended: {result.reason}"
    state["reason"] = result.reason
    return reboot.is_set()


def _watch_boot(backend: Any, stop: threading.Event, ended: threading.Event, reboot: threading.Event,
                every: float, state: dict[str, Any]) -> None:
    """Set ``ended`` when ``stop`` is set, or (and ``reboot``) when the guest's kernel is no longer the
    one ``backend`` traces: it rebooted, or is rebooting (no running kernel found); the collector's
    ``state`` then says ``rebooting`` (not alive) from that moment.

    Two signs, at each look: the traced kernel's clock (``jiffies_64``, read where the traced profile
    says) went back or leapt (the next boot is writing over the old kernel's memory:
    :func:`~vims.collector.kaslr.at_clock_pace`), or the guest's profile, looked up again, places the
    kernel elsewhere, or finds none running while the traced clock has stood still for :data:`STILL_S`
    (a guest that merely runs slowly lets every clock stand for a few seconds).
    """
    text = backend.profile.symbol("_text")
    jiffies = backend.profile.symbol("jiffies_64")
    last, then = _clock(backend, jiffies), time.monotonic()
    ticked = then  # when the traced kernel's clock last moved
    while not ended.is_set():
        if stop.wait(every):
            break
        now, at = _clock(backend, jiffies), time.monotonic()
        leapt = now is None or last is None or not at_clock_pace(now - last, at - then)
        if now != last:
            ticked = at
        last, then = now, at
        try:
            moved = leapt or backend.guest.profile.symbol("_text") != text
        except VimsError:
            # No copy's clock moved while the guest was looked at: the kernel is going down or coming
            # up, or the guest runs slowly (a tickless idle kernel, or one the tracer holds halted).
            # A reboot only once the traced kernel's own clock has stood still for long.
            moved = at - ticked >= STILL_S
        if moved:
            state["state"] = "rebooting"  # at once: the tracer may take a while to let go of the old boot
            reboot.set()
            break
    ended.set()


def _clock(backend: Any, jiffies: int) -> int | None:
    """The traced kernel's ``jiffies_64`` (None when it cannot be read any more)."""
    try:
        return int(backend.kernel.u64(jiffies))
    except VimsError:
        return None


def _attach_new_boot(guest: Any, stop: threading.Event, every: float) -> Any:
    """A backend on the guest's new kernel once it runs (None if ``stop`` came first or QEMU ended)."""
    from vims.collector.backends import QemuBackend

    wait = every
    while not stop.is_set():
        if not guest.running:
            return None
        try:
            backend = QemuBackend.from_guest(guest)
        except VimsError:  # no kernel runs yet (each look scans the guest's RAM: back off, to 8 s)
            backend = None
        if backend is not None:
            if _kernel_ready(backend):
                return backend
            # Found while the new kernel still sets itself up: its offsets may not hold. Look again.
            backend.close()
            forget = getattr(guest, "forget_profile", None)
            if forget is not None:
                forget()
        stop.wait(wait)
        wait = min(2 * wait, 8.0)
    return None


def _kernel_ready(backend: Any) -> bool:
    """Whether the kernel ``backend`` places has set itself up: its process list reads, with init."""
    try:
        return any(t.pid == 1 for t in backend.kernel.tasks())
    except VimsError:
        return False
