"""The static checks against a guest, every few seconds, into the agent's report."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from vims.avm.agent import Agent


def check_loop(agent: Agent, guest: Any, stop: threading.Event, every: float, deep: bool,
               state: dict[str, Any], kernel: Callable[[], Any] | None = None) -> None:
    """Run the static checks against ``guest`` every ``every`` seconds until ``stop``.

    Until REM-S's policy comes, every light check (and the deep ones with ``deep``) runs every ``every``
    s; then the checks its plan names (:attr:`Agent.check_plan`), each as often as it says. Each
    round first asks whether the guest's kernel is still where the checks look (a reboot in place moves
    it: KASLR); if not, the checks move to the new kernel, and while none runs the
    report carries an error row, never the last boot's rows.

    ``kernel`` tells which kernel runs: the profile of the boot the tracer traces, ``None`` while
    the guest reboots (:func:`~vims.avm.guest_source.trace_guest` gives it, as its watcher follows
    reboots). Without it each round asks the guest (:attr:`Guest.profile`), which may watch the
    kernels' clocks for seconds when RAM holds more than one copy.
    """
    from vims.collector.backends import QemuBackend
    from vims.collector.checks.base import Context

    def running() -> Any:  # the profile of the kernel that runs now (None: it is rebooting)
        return kernel() if kernel is not None else backend.guest.profile

    try:
        backend = QemuBackend.from_guest(guest, None if kernel is None else kernel())
        ctx = Context.of_guest(backend)
    except Exception as exc:  # no checks is reported, not fatal: behaviour still counts
        state["checks"] = f"cannot run: {type(exc).__name__}: {exc}"
        return
    try:
        latest: dict[str, list[dict[str, Any]]] = {}  # each check's last rows
        ran: dict[str, float] = {}  # when each check last ran (monotonic)
        while not stop.is_set():
            start = time.monotonic()
            try:
                profile = running()
                if profile is None:
                    agent.set_checks([_error_row("checks", "the guest is rebooting: no kernel to check until "
                                                           "the new one runs")])
                    stop.wait(min(every, 1.0))
                    continue
                if not _same_kernel(profile, backend.profile):
                    backend.close()
                    backend = QemuBackend.from_guest(backend.guest, profile)  # the kernel of the new boot
                    ctx = Context.of_guest(backend)
                    ran.clear()
                    latest.clear()
                periods = _schedule(agent.check_plan, deep, every)
                due = _due(periods, ran, start)
                for name, check in due:
                    ran[name] = time.monotonic()
                    latest[name] = _run_one(ctx, name, check)
                agent.set_checks([row for name in periods for row in latest.get(name, [])])
                state["checks"] = f"{len(due)} check(s) in {time.monotonic() - start:.2f} s"
                wait = _next_look(periods, ran, time.monotonic())
            except Exception as exc:  # a check that breaks is an error row, and the loop goes on
                agent.set_checks([_error_row("checks", f"{type(exc).__name__}: {exc}")])
                wait = every
            stop.wait(wait)
    finally:
        backend.close()


def _place(profile: Any) -> tuple[int, int | None]:
    """Where ``profile`` puts the kernel: ``_text``'s virtual address and KASLR's ``phys_base`` (None when
    the profile was not relocated in guest RAM)."""
    kaslr = (getattr(profile, "metadata", None) or {}).get("kaslr") or {}
    return int(profile.symbol("_text")), None if "phys_base" not in kaslr else int(kaslr["phys_base"])


def _same_kernel(a: Any, b: Any) -> bool:
    """Whether two profiles place the kernel alike, virtually and physically: a new boot may draw the
    same virtual offset and another physical one (KASLR draws them apart), and the checks must then
    move to it.

    >>> from vims.collector.profile import KernelProfile, example_profile
    >>> d = example_profile()
    >>> d["symbols"]["_text"] = {"address": 0xFFFFFFFF81000000, "type": "T"}
    >>> p = KernelProfile.from_dict({**d, "metadata": {"relocatable": True}})
    >>> _same_kernel(p.relocated(0x200000, 0x1000000), p.relocated(0x200000, 0x1000000))
    True
    >>> _same_kernel(p.relocated(0x200000, 0x1000000), p.relocated(0x200000, 0x3000000))
    False
    >>> _same_kernel(p.relocated(0x200000, 0x1000000), p.relocated(0x400000, 0x1000000))
    False
    """
    return _place(a) == _place(b)


def _schedule(plan: list[dict[str, Any]] | None, deep: bool, every: float) -> dict[str, float]:
    """Each check to run and its period. REM-S decides which checks run and how often: once its policy
    came, the checks its plan names, each at its ``every_s``; until then the A-VM's own (every light
    check, and the deep ones with ``deep``, every ``every`` s).

    >>> own = _schedule(None, False, 10.0)
    >>> own["syscall-table"], "process-binaries" in own  # a light check, and a deep one
    (10.0, False)
    >>> _schedule([{"check": "syscall-table", "every_s": 5.0}, {"check": "process-binaries"}], False, 10.0)
    {'syscall-table': 5.0, 'process-binaries': 10.0}
    """
    from vims.collector.checks.base import select

    if plan:
        return {str(entry["check"]): float(entry.get("every_s") or every) for entry in plan}
    return {c.name: every for c in select(deep=deep)}


def _due(periods: dict[str, float], ran: dict[str, float], now: float) -> list[tuple[str, Any]]:
    """The checks to run now, in the schedule's order. A name this A-VM does not know comes as ``None``
    (an error row: REM-S asked for evidence it cannot have, and refuses).

    >>> due = _due({"syscall-table": 5.0, "nope": 2.0}, {"syscall-table": 100.0}, 103.0)
    >>> [(name, check is None) for name, check in due]
    [('nope', True)]
    """
    from vims.collector.checks.base import registry

    known = registry()
    return [(name, known[name]() if name in known else None)
            for name, period in periods.items() if ran.get(name, -float("inf")) + period <= now]


def _next_look(periods: dict[str, float], ran: dict[str, float], now: float) -> float:
    """Seconds until the next check is due, counted after the round (a long round does not make the
    next one late).

    >>> _next_look({"syscall-table": 5.0, "idt": 10.0}, {"syscall-table": 100.0, "idt": 100.0}, 103.5)
    1.5
    """
    lefts = [ran.get(name, -float("inf")) + period - now for name, period in periods.items()]
    return max(0.1, min(lefts, default=1.0))


def _run_one(ctx: Any, name: str, check: Any) -> list[dict[str, Any]]:
    """One check's rows as dicts; a check unknown here, or one that breaks, is an error row."""
    if check is None:
        return [_error_row(name, f"check {name!r} is not one this A-VM has")]
    try:
        return [r.as_dict() for r in check(ctx)]
    except Exception as exc:
        return [_error_row(name, f"{type(exc).__name__}: {exc}")]


def _error_row(check: str, detail: str) -> dict[str, Any]:
    return {"check": check, "target": "guest", "status": "error", "detail": detail, "cost": "light",
            "ts_ns": time.time_ns()}
