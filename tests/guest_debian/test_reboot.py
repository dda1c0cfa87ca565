"""A Debian guest rebooted in place, twice, as users reboot their VMs: QEMU and its RAM file stay, the
kernel comes back at new KASLR offsets, and every check still passes on a clean guest.

This test boots a guest of its own (the reboots would pull the shared one from under other tests).
"""

from __future__ import annotations

import os

from vims.collector.backends import QemuBackend
from vims.collector.checks import Context, registry, run_checks
from vims.collector.guest import Guest
from vims.collector.guest.debian import DebianImage


def _all_checks(guest: Guest) -> list[tuple[str, str, str, str | None]]:
    """Every registered check on ``guest``: the rows that do not pass (check, target, status, detail)."""
    with QemuBackend.from_guest(guest) as backend:
        rows = run_checks(Context.of_guest(backend), [cls() for cls in registry().values()])
    assert {r.check for r in rows} == set(registry())
    return [(r.check, r.target, r.status, r.detail) for r in rows if r.status != "pass"]


def test_every_check_passes_after_each_of_two_reboots(debian_image: DebianImage) -> None:
    guest = Guest.start(debian_image, name=f"vims-test-reboot-{os.getpid()}")
    try:
        offsets = []
        for boot in range(3):
            if boot:
                guest.reboot()
            text = guest.profile.symbol("_text")  # where this boot put the kernel (found in its RAM)
            offsets.append(text)
            assert _all_checks(guest) == [], f"boot {boot + 1} (_text at {text:#x})"
        assert len(set(offsets)) >= 2, [hex(o) for o in offsets]  # 3 boots on one of ~500 offsets: KASLR stuck
    finally:
        guest.stop()
