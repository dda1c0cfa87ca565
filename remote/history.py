"""REM-S's history writer: every write to the database runs in one thread, never on the event loop.

The event loop hands writes (``record_report``, ``record_decision``, ...) to :class:`HistoryWriter`,
which runs them one after another, in order, on its own connection to the database. Each write gives a
:class:`concurrent.futures.Future` the loop may await (a report is recorded before it is answered).

A write that fails (database locked, read-only, disk full) makes the history *unwritable*: the writer
logs it, counts it (``vims_history_write_failures_total``), sets ``vims_history_writable`` to 0 and
tries the write again until it succeeds (``retry=True``, the default) or gives it up at once
(``retry=False``: the write of an allow decision, which the gate turns into a refusal instead).
A write that has been running for longer than ``stall_s`` counts as unwritable too. While the history
is unwritable, the gate refuses every new connection (:attr:`HistoryWriter.trouble` says why).

Accepted reports that queue up behind each other (up to :data:`MAX_GROUP`) are written in one
transaction (:meth:`~vims.remote.store.Store.accept_reports`, each in its own savepoint): one commit, so
one flush to disk, for the group, which is what lets one verifier keep up with thousands of A-VMs. Each
report still gets its own answer; a group whose transaction fails refuses every report in it (none was
recorded), as a single failed write does.

>>> import tempfile
>>> from pathlib import Path
>>> from vims.remote.metrics import Metrics
>>> tmp = tempfile.TemporaryDirectory()
>>> w = HistoryWriter(Path(tmp.name) / "rems.sqlite", Metrics())
>>> w.submit("record_decision", vm_id="vm-1", conn_id="vm-1#1", kind="deny", reason="test").result(10)
>>> w.trouble() is None
True
>>> w.close(); tmp.cleanup()
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vims.remote.metrics import Metrics
from vims.remote.store import Store

log = logging.getLogger("vims.remote.server")

#: Writes that may wait; beyond this a write is dropped (counted, logged) and the history is unwritable.
MAX_PENDING = 10000
#: The most accepted reports written in one transaction.
MAX_GROUP = 64
_NOTHING = object()


@dataclass
class _Write:
    method: str
    kwargs: dict[str, Any]
    retry: bool
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


def _groups(write: _Write) -> bool:
    """Whether ``write`` may share a transaction: an accepted report, which is never retried."""
    return write.method == "accept_report" and not write.retry


class HistoryWriter:
    """Run the writes of :class:`~vims.remote.store.Store` in a thread of their own.

    Parameters
    ----------
    location : Path or str
        The store, as :class:`~vims.remote.store.Store` opens it (a SQLite file, ``postgresql://...``);
        the writer opens its own connection.
    metrics : Metrics
        Where ``vims_history_writable`` and ``vims_history_write_failures_total`` are kept.
    busy_timeout_s : float
        How long one attempt waits for a lock held by another connection.
    stall_s : float
        A write running longer than this makes the history count as unwritable.
    retry_every_s : float
        Pause between attempts of a failed write.
    max_group : int
        The most accepted reports written in one transaction (1: each in its own).
    """

    def __init__(self, location: Path | str, metrics: Metrics, busy_timeout_s: float = 1.0, stall_s: float = 0.5,
                 retry_every_s: float = 0.2, max_group: int = MAX_GROUP) -> None:
        if max_group < 1:
            raise ValueError(f"max_group {max_group}: at least 1")
        self.location = location
        self.max_group = max_group
        self.metrics = metrics
        self.stall_s = stall_s
        self.retry_every_s = retry_every_s
        self._store = Store(location)
        self._store.set_busy_timeout(busy_timeout_s)
        self._queue: queue.Queue[_Write | None] = queue.Queue()
        self._failure: str | None = None
        self._busy_since: float | None = None
        self._dropped = 0
        self.groups = 0  # transactions that wrote more than one accepted report
        self.metrics.set("vims_history_writable", 1)
        self._thread = threading.Thread(target=self._run, name="rem-s-history", daemon=True)
        self._thread.start()

    def submit(self, method: str, *, retry: bool = True, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Queue ``Store.<method>(**kwargs)``; the future holds its result (or the error, ``retry=False``)."""
        item = _Write(method, kwargs, retry)
        if self._queue.qsize() >= MAX_PENDING:
            self._dropped += 1
            self._fail(f"{self._queue.qsize()} writes pending, {method} dropped")
            item.future.set_exception(sqlite3.OperationalError("history write queue full"))
            return item.future
        self._queue.put(item)
        return item.future

    def trouble(self) -> str | None:
        """Why the history cannot be written now (one line), or None when it can."""
        if self._failure is not None:
            return self._failure
        since = self._busy_since
        if since is not None and time.monotonic() - since > self.stall_s:
            return f"history write blocked for {time.monotonic() - since:.1f} s"
        return None

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _fail(self, why: str) -> None:
        if self._failure is None:
            log.error("history cannot be written: %s; refusing new connections", why)
        self._failure = why
        self.metrics.set("vims_history_writable", 0)
        self.metrics.inc("vims_history_write_failures_total")

    def _recovered(self) -> None:
        if self._failure is not None:
            log.warning("history writable again (was: %s)", self._failure)
        self._failure = None
        self.metrics.set("vims_history_writable", 1)

    def _run(self) -> None:
        held: Any = _NOTHING  # the write taken from the queue behind a group, written next
        while True:
            item = self._queue.get() if held is _NOTHING else held
            held = _NOTHING
            if item is None:
                return
            group = [item]
            if _groups(item):
                held = self._gather(group)
            group = [w for w in group if w.future.set_running_or_notify_cancel()]
            if len(group) > 1:
                self._attempt_group(group)
            elif group:
                self._attempt(group[0])

    def _gather(self, group: list[_Write]) -> Any:
        """Add the accepted reports queued right behind ``group[0]`` (up to ``max_group``); return the
        write taken after them that does not belong (or :data:`_NOTHING`)."""
        while len(group) < self.max_group:
            try:
                after = self._queue.get_nowait()
            except queue.Empty:
                return _NOTHING
            if after is None or not _groups(after):
                return after
            group.append(after)
        return _NOTHING

    def _attempt_group(self, group: list[_Write]) -> None:
        """Accepted reports in one transaction (never retried: a report not recorded is refused)."""
        self._busy_since = time.monotonic()
        try:
            results = self._store.accept_reports([w.kwargs for w in group])
        except Exception as exc:
            self._busy_since = None
            if isinstance(exc, sqlite3.Error | OSError):
                self._fail(f"accept_report ({len(group)} in one transaction): {exc}")
            else:
                log.exception("history write accept_reports")
            for w in group:
                w.future.set_exception(exc)
            return
        self._busy_since = None
        self.groups += 1
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            self._fail(f"accept_report: {failed[0]}")
        else:
            self._recovered()
        for w, result in zip(group, results, strict=True):
            if isinstance(result, Exception):
                w.future.set_exception(result)
            else:
                w.future.set_result(result)

    def _attempt(self, item: _Write) -> None:
        while True:
            self._busy_since = time.monotonic()
            try:
                result = getattr(self._store, item.method)(**item.kwargs)
            except (sqlite3.Error, OSError) as exc:
                self._busy_since = None
                self._fail(f"{item.method}: {exc}")
                if not item.retry or self._closing:
                    item.future.set_exception(exc)
                    return
                time.sleep(self.retry_every_s)
                continue
            except Exception as exc:  # a bug: do not retry it for ever
                self._busy_since = None
                log.exception("history write %s", item.method)
                item.future.set_exception(exc)
                return
            self._busy_since = None
            self._recovered()
            item.future.set_result(result)
            return

    _closing = False

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout`` s), then stop and close the connection."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._closing = True
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._store.close()
