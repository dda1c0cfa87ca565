"""REM-S's history in PostgreSQL: the shared store for a fleet (``postgresql://...``).

The operations are :class:`~vims.remote.store.Store`'s, in the same SQL as SQLite's; this backend gives
them a connection (psycopg 3, autocommit: each write its own committed transaction, like SQLite's),
transactions, and what differs in PostgreSQL's dialect:

- locking transactions (enrolment, a new policy, migrations) take one transaction-level advisory lock,
  so they are serialised across every process on the database, as SQLite's ``BEGIN IMMEDIATE`` is;
- :meth:`PostgresStore.data_version` reads a counter that enrolments, revocations and policies bump in
  their own transaction (SQLite's ``PRAGMA data_version`` changes on any other connection's commit);
- :meth:`PostgresStore.notifications` LISTENs on the channel the schema's triggers notify on commit
  (migration 3): enrolments, revocations and policies changed, and leases that change holder, so a
  verifier learns of them at once instead of polling (:class:`PostgresNotifications`);
- text cannot hold NUL in PostgreSQL: a NUL in a stored string (only the undecodable garbage of a
  refused message has one) is stored as U+FFFD, so such a row is kept, not refused.

Faults: any psycopg error becomes :class:`~vims.remote.store.StoreError`, naming the store (password
masked) and PostgreSQL's reason. A lost connection is dropped and the *next* operation connects again;
the failed one is not retried here (a write whose commit was cut off may or may not have happened: the
history writer decides, and REM-S fails closed meanwhile).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from vims.remote.store import Store, StoreError, mask_location
from vims.remote.store_migrations import migrate

#: The channel the schema's triggers notify on (store_migrations, version 3).
CHANNEL = "vims_rems"
#: The advisory lock of locking transactions (any fixed 64-bit key; "VIMSREMS" in ASCII).
LOCK_KEY = 0x56494D5352454D53
#: libpq parameters given unless the URL sets them: a server that stops answering fails an operation in
#: seconds (connecting; a TCP connection whose peer vanished), not after the kernel's minutes.
DEFAULTS: dict[str, Any] = {"connect_timeout": 5, "keepalives_idle": 10, "keepalives_interval": 5,
                            "keepalives_count": 3, "tcp_user_timeout": 10000, "application_name": "vims-rems"}


def _reason(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class PostgresStore(Store):
    """The history in a PostgreSQL database (tables in the connection's ``search_path`` schema).

    Parameters
    ----------
    location : str
        A libpq URL, ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?param=...]`` (any libpq parameter,
        e.g. ``host=/run/postgresql`` for a unix socket, ``sslmode=``, ``options=-csearch_path=...``).
        Better no password in it: libpq also reads ``~/.pgpass`` and ``PGPASSWORD``.
    create : bool
        Whether the tables may be created in a database that has none.
    """

    dialect = "postgresql"
    _greatest = "GREATEST"
    _now = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"

    def __init__(self, location: str | Path, *, create: bool = True) -> None:
        self.location = self._url = str(location)
        self.display = mask_location(self._url)
        try:
            params = conninfo_to_dict(self._url)
        except psycopg.Error as exc:
            raise StoreError(f"not a PostgreSQL URL: {self.display}: {_reason(exc)}") from None
        self._password = str(params.get("password") or "")
        self._extra = {k: v for k, v in DEFAULTS.items() if k not in params}
        self._lock_timeout_ms: int | None = None
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        self._sql: dict[str, str] = {}
        self._connection()
        migrate(self, create)

    # -- the connection -------------------------------------------------------------------------------

    def _say(self, what: str, exc: BaseException) -> StoreError:
        text = f"PostgreSQL store {self.display}: {what}: {_reason(exc)}"
        return StoreError(text.replace(self._password, "***") if self._password else text)

    def _connection(self) -> psycopg.Connection[dict[str, Any]]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            conn = psycopg.connect(self._url, autocommit=True, row_factory=dict_row, **self._extra)
            if self._lock_timeout_ms is not None:
                conn.execute(f"SET lock_timeout = {self._lock_timeout_ms}")
        except psycopg.Error as exc:
            raise self._say("cannot connect", exc) from None
        self._conn = conn
        return conn

    @contextlib.contextmanager
    def _guard(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """The connection; a psycopg error in the block becomes a StoreError (a lost connection dropped)."""
        conn = self._connection()
        try:
            yield conn
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                self._conn = None
                with contextlib.suppress(Exception):
                    conn.close()
                raise self._say("connection lost (the next operation reconnects)", exc) from exc
            raise self._say("refused", exc) from exc

    def _query(self, sql: str) -> str:
        query = self._sql.get(sql)
        if query is None:
            query = self._sql[sql] = sql.replace("?", "%s")
        return query

    @staticmethod
    def _params(params: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(p.replace("\x00", "\ufffd") if isinstance(p, str) and "\x00" in p else p for p in params)

    # -- the primitives of Store ----------------------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._guard() as conn:
            return conn.execute(self._query(sql), self._params(params)).fetchall()

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._guard() as conn:
            return int(conn.execute(self._query(sql), self._params(params)).rowcount)

    def _insert(self, sql: str, params: Sequence[Any]) -> int:
        with self._guard() as conn:
            row = conn.execute(self._query(sql + " RETURNING id"), self._params(params)).fetchone()
        return int(row["id"]) if row else 0

    @contextlib.contextmanager
    def _transaction(self, lock: bool = False) -> Iterator[None]:
        with self._guard() as conn, conn.transaction():
            if lock:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            yield

    def _has_table(self, name: str) -> bool:
        return bool(self._value("SELECT to_regclass(?::text) IS NOT NULL AS present", (name,)))

    def _changed(self) -> None:
        self._exec("UPDATE rems_changes SET version = version + 1 WHERE id = 1")

    def data_version(self) -> int:
        """Bumped by every enrolment, revocation and policy, whichever process made it."""
        return int(self._value("SELECT version FROM rems_changes WHERE id = 1") or 0)

    def set_busy_timeout(self, seconds: float) -> None:
        """PostgreSQL's ``lock_timeout`` for this connection (kept across reconnections)."""
        self._lock_timeout_ms = max(1, int(seconds * 1000))
        self._exec(f"SET lock_timeout = {self._lock_timeout_ms}")

    def notifications(self) -> PostgresNotifications:
        """LISTEN on :data:`CHANNEL` on a new connection (:class:`PostgresNotifications`)."""
        return PostgresNotifications(self)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


class PostgresNotifications:
    """The notices of one store (its schema), on a connection of their own that LISTENs.

    PostgreSQL delivers a notification when the transaction that sent it commits, in commit order.
    Notices of other schemas on the same database (other stores) are passed over; a payload that cannot
    be read counts as ``{"kind": "changes"}`` (the reader reads the store again: nothing is missed).

    Parameters
    ----------
    store : PostgresStore
        The store whose notices to hear (its URL, with the same libpq defaults).
    """

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        try:
            self.conn = psycopg.connect(store._url, autocommit=True, **store._extra)
            row = self.conn.execute("SELECT current_schema()").fetchone()
            self.schema = str(row[0]) if row else "public"
            self.conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            raise store._say("cannot listen for notifications", exc) from None

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """The notices that arrive within ``timeout`` seconds (returns at the first batch)."""
        try:
            got = list(self.conn.notifies(timeout=timeout, stop_after=1))
            if got:  # whatever came in the same burst
                got += self.conn.notifies(timeout=0.005)
        except psycopg.Error as exc:
            raise self.store._say("notifications lost (listening again)", exc) from None
        notices = []
        for note in got:
            try:
                notice = json.loads(note.payload)
                if not isinstance(notice, dict) or "kind" not in notice:
                    raise ValueError("no kind")
            except ValueError:
                notice = {"kind": "changes", "schema": self.schema}
            if notice.get("schema") == self.schema:
                notices.append(notice)
        return notices

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
