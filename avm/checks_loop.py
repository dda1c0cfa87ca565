"""The static checks against a guest, every few seconds, into the agent's report."""

from __future__ import annotations

import threading
import time
from typing import Any

from vims.avm.agent import Agent


def check_loop(agent: Agent, guest: Any, stop: threading.Event, every: float, deep: bool,
                state: dict[str, Any]) -> None:
    """Run the static checks against ``guest`` every ``every`` seconds until ``stop``.

    Each round first asks whether the guest's kernel is still where the checks look (a reboot in
    place moves it: KASLR); if not, the checks move to the new kernel, and while none runs the
    report carries an error row, never the last boot's rows.
    """
    from vims.collector.backends import QemuBackend
    from vims.collector.checks.base import Context, run_checks, select

    try:
        backend = QemuBackend.from_guest(guest)
        ctx = Context.of_guest(backend)
    except Exception as exc:  # no checks is reported, not fatal: behaviour still counts
        state["checks"] = f"cannot run: {type(exc).__name__}: {exc}"
        return
    try:
        checks = select(deep=deep)
        while not stop.is_set():
            start = time.monotonic()
            try:
                if backend.guest.profile.symbol("_text") != backend.profile.symbol("_text"):
                    backend.close()
                    backend = QemuBackend.from_guest(backend.guest)  # the kernel of the new boot
                    ctx = Context.of_guest(backend)
                rows = run_checks(ctx, checks)
                agent.set_checks([r.as_dict() for r in rows])
                state["checks"] = f"{len(rows)} rows in {time.monotonic() - start:.2f} s"
            except Exception as exc:  # a check that breaks is an error row, and the loop goes on
                agent.set_checks([{"check": "checks", "target": "guest", "status": "error",
                                   "detail": f"{type(exc).__name__}: {exc}", "cost": "light",
                                   "ts_ns": time.time_ns()}])
            stop.wait(every)
    finally:
        backend.close()
