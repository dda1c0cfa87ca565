"""The static checks against a guest, every few seconds, into the agent's report."""

from __future__ import annotations

import threading
import time
from typing import Any

from vims.avm.agent import Agent


def check_loop(agent: Agent, guest: Any, stop: threading.Event, every: float, deep: bool,
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
