"""The Debian guests rebooted in place, twice each, as users reboot their VMs: QEMU and its RAM file
stay, the kernel comes back at new KASLR offsets (while the previous boot's copy may still sit in RAM),
and every check still passes on a clean guest, with PTI at its default and with ``pti=on``.

These tests reboot the session's shared guests, so the conftest runs them after every other test; the
A-VM tracing a guest through its reboot follows it to the new kernel.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from vims.avm.agent import Agent
from vims.avm.guest_source import trace_guest
from vims.collector.backends import QemuBackend
from vims.collector.checks import Context, registry, run_checks
from vims.collector.guest import Guest
from vims.errors import VimsError
from vims.models.stide import Stide

pytestmark = pytest.mark.reboots
#: A reboot under TCG takes 1-2 minutes on an idle machine; a loaded one (CI) may take several.
REBOOT_S = 600.0
#: What a check reads through a profile that places the kernel's data wrongly (the known gap below).
WRONG_PLACE = ("is not canonical", "is not mapped", "is outside guest RAM")


def _not_passing(guest: Guest) -> list[tuple[str, str, str, str | None]]:
    """Every registered check on ``guest``: the rows that do not pass (check, target, status, detail)."""
    with QemuBackend.from_guest(guest) as backend:
        rows = run_checks(Context.of_guest(backend), [cls() for cls in registry().values()])
    assert {r.check for r in rows} == set(registry())
    return [(r.check, r.target, r.status, r.detail) for r in rows if r.status != "pass"]


def test_every_check_passes_after_each_of_two_reboots(any_debian: Guest) -> None:
    guest = any_debian
    offsets = []
    for boot in range(3):
        if boot:
            guest.reboot(timeout=REBOOT_S)
        text = guest.profile.symbol("_text")  # where this boot put the kernel (found in its RAM)
        offsets.append(text)
        assert _not_passing(guest) == [], f"boot {boot + 1} (_text at {text:#x})"
        assert guest.status()["kaslr"]["text_vaddr"] == hex(text)  # the status finds the same, by CR3
    assert len(set(offsets)) >= 2, [hex(o) for o in offsets]  # 3 boots on one of ~500 offsets: KASLR stuck


def _stide() -> Stide:
    """Any detector: this test is about the A-VM's view of the guest, not about scores."""
    rng = np.random.default_rng(0)
    return Stide(k=3).fit([rng.integers(0, 300, size=200).tolist() for _ in range(10)])


def _wait(predicate: Callable[[], bool], seconds: float, what: str, seen: Callable[[], object]) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {seconds:g} s; last seen: {seen()}"
        time.sleep(0.5)


def _checks(agent: Agent) -> list[dict[str, Any]]:
    agent.report()
    return list(agent.last_content["checks"])


def test_the_avm_follows_the_guest_through_a_reboot(debian: Guest) -> None:
    """The A-VM tracing the guest notices the reboot, is not alive while no kernel is traced, and traces
    and checks the new boot's kernel once it is up (checks all pass, measured after the reboot)."""
    stop, ready = threading.Event(), threading.Event()
    failure: list[BaseException] = []
    with Agent(_stide(), vm_id="vm-reboot", workers=1, interval_s=2.0) as agent:

        def tracing() -> None:
            try:
                trace_guest(agent, debian, stop, checks_every=5.0, watch_every=1.0, on_ready=ready.set)
            except BaseException as exc:
                failure.append(exc)
                ready.set()

        thread = threading.Thread(target=tracing)
        thread.start()
        states: list[str] = []

        def sample() -> None:
            while not stop.is_set():
                states.append(agent.collector_health()["state"])
                time.sleep(0.2)

        try:
            assert ready.wait(120) and not failure, failure
            health = agent.collector_health
            _wait(lambda: health()["alive"], 120, "the tracer delivering", health)
            threading.Thread(target=sample, daemon=True).start()
            rebooted_ns, reboots = time.time_ns(), health()["reboots"]
            # Not Guest.reboot, which waits for an ssh login: under full tracing of the new boot a login
            # can take minutes. The A-VM's own view is what this test waits on.
            with contextlib.suppress(VimsError):  # the connection may drop before the answer
                debian.execute("systemctl reboot", timeout=10, wait=20.0)
            _wait(lambda: health()["reboots"] > reboots and health()["state"] == "tracing" and health()["alive"]
                  and health()["events"] > 0, REBOOT_S, "tracing the new boot", health)
            assert "rebooting" in states, sorted(set(states))  # not alive while no kernel was traced

            def fresh_and_passing() -> bool:
                rows = _checks(agent)
                return bool(rows) and all(r["ts_ns"] > rebooted_ns and r["status"] == "pass" for r in rows)

            try:
                _wait(fresh_and_passing, 90, "every check passing on the new boot", lambda: [
                    (r["check"], r["status"], r.get("detail")) for r in _checks(agent) if r["status"] != "pass"])
            except AssertionError as exc:
                # The known gap (issue 15's note, 2026-12-03): the new boot's profile, found while
                # that kernel is still setting itself up under full tracing, can place its data wrongly,
                # and the checks then read through it into nothing: pointers that are not canonical,
                # not mapped, or outside guest RAM. Only those read errors are expected.
                if not any(symptom in str(exc) for symptom in WRONG_PLACE):
                    raise
                pytest.xfail(f"checks on the new boot read through a profile found too early: {exc}"[:800])
            assert failure == []
        finally:
            stop.set()
            thread.join(timeout=60)
