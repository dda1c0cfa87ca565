"""One real QEMU guest for the whole test run, shared by every test in ``tests/guest/``.

``guest_image`` builds the image (or takes it from the cache: the first build takes about a minute,
later ones a fraction of a second); ``guest`` boots it once and stops it at the end of the session.
They are skipped, saying why, only when ``qemu-system-x86_64`` is absent. Every test here is marked
``guest``.

Tests that change the guest (scenarios, writes through the GDB stub) must undo what they did:
``guest.reset()`` undoes the scenarios.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.required import missing
from vims.collector.guest import Guest, GuestImage, build_guest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.guest)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest image (built once, then cached under the VIMS cache)."""
    if shutil.which("qemu-system-x86_64") is None:
        missing("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    return build_guest()


@pytest.fixture(scope="session")
def guest(guest_image: GuestImage) -> Iterator[Guest]:
    """A running guest, booted once for the session."""
    running = Guest.start(guest_image, name=f"vims-test-{os.getpid()}")
    try:
        yield running
    finally:
        running.stop()
