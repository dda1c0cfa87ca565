"""What the suite needs: in CI (``CI=true``, as ``.ci/run`` runs) a missing part is a failure, not a skip.

QEMU, bpftool, mke2fs, PostgreSQL's server binaries, the cached guest kernel and the public data sets are
part of the set-up (``scripts/system-packages.sh``, ``make setup``, ``../shared/datasets``); a test that
needs one calls :func:`missing` when it is absent. On a user's machine that skips the test, saying what
to install or where to put it; in CI it fails, so a broken set-up cannot pass as "skipped". Only
explicitly optional extras (LibVMI) call ``pytest.skip`` themselves.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True when the suite runs in CI (``CI`` set to ``true`` or ``1``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(what: str) -> NoReturn:
    """Skip the test for the absent required part ``what`` (a message saying how to get it); fail in CI."""
    if in_ci():
        pytest.fail(f"required in CI, missing: {what}", pytrace=False)
    pytest.skip(what)
