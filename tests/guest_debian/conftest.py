"""One booted Debian guest for the whole test run, shared by every test in ``tests/guest_debian/``.

``debian_image`` builds the Debian image (mmdebstrap, about 80 s; then cached); ``debian`` boots it
once with the distribution's default command line (KASLR on) and stops it at the end of the session;
``debian_pti`` boots a second one with ``pti=on`` for the tests that run under both; ``debian_qemu64``
a third on another CPU model, booted at the first test that asks for it. Every test here
is marked ``guest``; tests marked ``reboots`` (they reboot the shared guests) run after all others.
While developing, ``VIMS_TEST_DEBIAN=NAME`` uses the detached guest ``NAME``
(`vims guest up --image debian --name NAME`) instead of booting one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.required import missing
from vims.collector.guest import Guest
from vims.collector.guest.debian import DebianImage, build_debian

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.guest)
    # A reboot pulls the shared guest from under the tests that follow: those tests go last (stable).
    items.sort(key=lambda item: item.get_closest_marker("reboots") is not None)


@pytest.fixture(scope="session")
def debian_image() -> DebianImage:
    """The Debian guest image (built once, then cached under the VIMS cache)."""
    for tool in ("qemu-system-x86_64", "mmdebstrap", "ssh"):
        if shutil.which(tool) is None:
            missing(f"{tool} not found (scripts/system-packages.sh installs it)")
    return build_debian()


def _boot(image: DebianImage, name: str, extra: tuple[str, ...] = ()) -> Iterator[Guest]:
    attached = os.environ.get("VIMS_TEST_DEBIAN" + ("_PTI" if extra else ""))
    if attached:
        yield Guest.attach(attached)
        return
    running = Guest.start(image, name=f"{name}-{os.getpid()}", extra_args=extra)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def debian(debian_image: DebianImage) -> Iterator[Guest]:
    """A running Debian guest with the default command line, booted once for the session."""
    yield from _boot(debian_image, "vims-test-debian")


@pytest.fixture(scope="session")
def debian_pti(debian_image: DebianImage) -> Iterator[Guest]:
    """A running Debian guest booted with ``pti=on`` (the one option added to the default line)."""
    yield from _boot(debian_image, "vims-test-debian-pti", ("pti=on",))


@pytest.fixture(scope="session")
def debian_qemu64(debian_image: DebianImage) -> Iterator[Guest]:
    """The same image on QEMU's ``qemu64`` CPU model: other CPU features (the kernel patches itself
    otherwise at boot), no LA57 (4-level page tables, which Volatility 3 reads: it has no 5-level
    Intel layer), and a boot of its own (a new KASLR offset). ``VIMS_TEST_DEBIAN_QEMU64=NAME`` attaches."""
    attached = os.environ.get("VIMS_TEST_DEBIAN_QEMU64")
    if attached:
        yield Guest.attach(attached)
        return
    running = Guest.start(debian_image, name=f"vims-test-debian-qemu64-{os.getpid()}", cpu="qemu64")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(params=["default", "pti"])
def any_debian(request: pytest.FixtureRequest) -> Guest:
    """Each of the two Debian guests in turn."""
    name = "debian" if request.param == "default" else "debian_pti"
    guest: Guest = request.getfixturevalue(name)
    return guest
