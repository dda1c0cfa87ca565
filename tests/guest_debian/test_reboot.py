"""The Debian guests rebooted in place, twice each, as users reboot their VMs: QEMU and its RAM file
stay, the kernel comes back at new KASLR offsets (while the previous boot's copy may still sit in RAM),
and every check still passes on a clean guest, with PTI at its default and with ``pti=on``.

These tests reboot the session's shared guests, so the conftest runs them after every other test.
"""

from __future__ import annotations

import pytest

from vims.collector.backends import QemuBackend
from vims.collector.checks import Context, registry, run_checks
from vims.collector.guest import Guest

pytestmark = pytest.mark.reboots


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
            guest.reboot()
        text = guest.profile.symbol("_text")  # where this boot put the kernel (found in its RAM)
        offsets.append(text)
        assert _not_passing(guest) == [], f"boot {boot + 1} (_text at {text:#x})"
        assert guest.status()["kaslr"]["text_vaddr"] == hex(text)  # the status finds the same, by CR3
    assert len(set(offsets)) >= 2, [hex(o) for o in offsets]  # 3 boots on one of ~500 offsets: KASLR stuck
