"""Fixtures shared by the whole suite.

The public data sets are found through ``VIMS_DATASETS`` (default ``../shared/datasets``); a test that
needs one is skipped, saying which, when it is absent, and fails when the suite runs in CI (``CI=true``):
every required part of the set-up goes through :func:`tests.required.missing`, which decides that.
Tests that use the real QEMU guest live in
``tests/guest/``, whose conftest boots one guest for the whole run.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from tests.required import missing
from vims.net import free_port
from vims.paths import datasets_dir


def _dataset(*parts: str) -> Path:
    path = datasets_dir().joinpath(*parts)
    if not path.exists():
        missing(f"public data set not found at {path} (set VIMS_DATASETS, default ../shared/datasets)")
    return path


@pytest.fixture(scope="session")
def adfa_zip() -> Path:
    """The ADFA-LD zip in its official layout."""
    return _dataset("adfa-ld", "ADFA-LD-dev.zip")


@pytest.fixture(scope="session")
def unm_dir() -> Path:
    """The folder of UNM programs (``synthetic-sendmail``, ``login-ps``)."""
    return _dataset("unm")


class LiveCollector:
    """A collector as ``vims collect --push`` is one, in a thread: it pushes normal events and a passing
    ``kernel-text`` result every ``every`` s to the agent's own ingest (``vims avm run --pull``), so the
    agent's reports carry the evidence REM-S's policy asks for (a live collector, scored calls, a fresh
    check) the way a traced guest's do.

    Each trace of ``traces`` runs as a process of its own (pids from 100), in turn, round after round.
    """

    def __init__(self, agent: Any, traces: list[list[int]], every: float = 0.1) -> None:
        self.agent, self.traces, self.every = agent, traces, every
        self.stop = threading.Event()
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> LiveCollector:
        from vims.avm.ingest import ingest
        from vims.remote.testing import wait_until

        rx = threading.Thread(target=ingest, args=(self.agent, self.endpoint, self.stop), daemon=True)
        rx.start()
        wait_until(lambda: self.agent.collector_health().get("endpoint") == self.endpoint, what="receiver bound")
        feed = threading.Thread(target=self._feed, daemon=True)
        feed.start()
        self._threads = [rx, feed]
        return self

    def _feed(self) -> None:
        from vims.collector.stream import BatchSender
        from vims.events import example_events

        events = BatchSender(self.endpoint, sender=self.agent.builder.vm_id, kind="event", queue_size=1000)
        checks = BatchSender(self.endpoint, sender=f"{self.agent.builder.vm_id}.checks", kind="check")
        seq, i = 0, 0
        try:
            while not self.stop.is_set():
                ev = example_events({100 + i: self.traces[i % len(self.traces)]}, start_seq=seq)
                seq, i = seq + ev.num_rows, i + 1
                events.send(ev)
                checks.send(pa.table({"check": ["kernel-text"], "target": ["kernel text"], "status": ["pass"],
                                      "detail": [None], "cost": ["light"],
                                      "ts_ns": pa.array([time.time_ns()], pa.uint64())}))
                self.stop.wait(self.every)
        finally:
            events.close()
            checks.close()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(10)


@pytest.fixture
def live_collector() -> type[LiveCollector]:
    """:class:`LiveCollector`, for tests whose agent must report like one watching a live guest."""
    return LiveCollector
