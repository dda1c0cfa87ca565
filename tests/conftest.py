"""Fixtures shared by the whole suite.

The public data sets are found through ``VIMS_DATASETS`` (default ``../shared/datasets``); a test that
needs one is skipped, saying which, when it is absent. Tests that use the real QEMU guest live in
``tests/guest/``, whose conftest boots one guest for the whole run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vims.paths import datasets_dir


def _dataset(*parts: str) -> Path:
    path = datasets_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"public data set not found at {path} (set VIMS_DATASETS)")
    return path


@pytest.fixture(scope="session")
def adfa_zip() -> Path:
    """The ADFA-LD zip in its official layout."""
    return _dataset("adfa-ld", "ADFA-LD-dev.zip")


@pytest.fixture(scope="session")
def unm_dir() -> Path:
    """The folder of UNM programs (``synthetic-sendmail``, ``login-ps``)."""
    return _dataset("unm")
