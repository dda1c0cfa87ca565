"""REM-S's history: A-VMs, policies, every report and every decision, behind one interface.

:class:`Store` opens the backend its location names and is the interface both backends implement:

- a path (or ``sqlite:///abs/path``, ``sqlite://rel/path``): one SQLite file in WAL mode, the embedded
  default for one machine (:class:`SqliteStore`);
- ``postgresql://...`` (or ``postgres://``): a PostgreSQL database, the shared store for fleets
  (:class:`vims.remote.store_postgres.PostgresStore`).

Every operation is written once, here, in SQL both backends run; a backend supplies the connection,
transactions, the placeholder style and what differs in its dialect. The schema is a versioned list of
migrations (:mod:`vims.remote.store_migrations`) applied when the store is opened.

Each write is its own committed transaction, so a restart (or a crash of REM-S) loses nothing that
was answered. The command-line tools open the same store while ``vims remote serve`` runs: a policy
set or an A-VM revoked there is picked up by the server, which watches :meth:`Store.data_version`.
A write that fails raises (SQLite: :class:`sqlite3.Error`; PostgreSQL: :class:`StoreError`, an
:class:`OSError`), which the history writer (:mod:`vims.remote.history`) treats as an unwritable
history: REM-S refuses connections until the write goes through.

>>> import tempfile
>>> from vims.remote.keys import AvmIdentity
>>> tmp = tempfile.TemporaryDirectory()
>>> s = Store(Path(tmp.name) / "rems.sqlite")
>>> avm = AvmIdentity.generate("avm-1")
>>> s.enroll(avm.public, "vm-1", gate_port=47001)["policy_version"]
1
>>> s.set_policy("vm-1", {"threshold": 0.9})
2
>>> s.policy("vm-1")["threshold"], s.policy("vm-1")["version"]
(0.9, 2)
>>> s.close(); tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, overload

from vims.errors import InputError, VimsError
from vims.remote.keys import AvmPublic, check_id
from vims.remote.policy import normalise_policy
from vims.remote.store_migrations import migrate

POSTGRES_SCHEMES = ("postgresql", "postgres")
#: The most history rows kept that name no VM (refusals of unknown or revoked keys), unless told otherwise.
MAX_UNATTRIBUTED = 10000


class Notifications(Protocol):
    """What :meth:`Store.notifications` gives: the store's notices, as another process commits them.

    A notice is a dict: ``{"kind": "changes"}`` (an enrolment, revocation or policy changed: what
    :meth:`Store.data_version` counts) or ``{"kind": "lease", "avm_id": ..., "holder": ...}`` (the A-VM's
    lease changed holder; ``holder`` None: given up). Renewals say nothing. A lost connection raises
    :class:`StoreError` from :meth:`wait`; notices sent meanwhile are lost, so the reader must read the
    store again once it listens again.
    """

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """The notices that arrive within ``timeout`` seconds (returns at the first batch)."""
        ...

    def close(self) -> None:
        """Stop listening and close the connection."""
        ...


class StoreError(VimsError, OSError):
    """The store cannot be reached, read or written now (a lost connection, a refused write).

    An :class:`OSError`, so the history writer counts it as an unwritable history and REM-S fails
    closed; a :class:`~vims.errors.VimsError`, so a command-line tool says it in one line.
    """


def mask_location(location: str | Path) -> str:
    """``location`` fit to print: a password in a URL (``user:pw@`` or ``password=``) becomes ``***``.

    >>> mask_location("postgresql://rems:s3cret@db.example/vims?sslmode=require&password=x")
    'postgresql://rems:***@db.example/vims?sslmode=require&password=***'
    """
    text = str(location)
    text = re.sub(r"(://[^/@:?#]*:)[^@]*@", r"\1***@", text)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", text)


def backend(location: str | Path) -> type[Store]:
    """The :class:`Store` class for ``location`` (a path, ``sqlite://...`` or ``postgresql://...``)."""
    text = os.fspath(location)
    scheme = text.partition("://")[0].lower() if "://" in text else ""
    if scheme in POSTGRES_SCHEMES:
        from vims.remote.store_postgres import PostgresStore

        return PostgresStore
    if scheme not in ("", "sqlite"):
        raise InputError(f"unknown store {mask_location(text)!r}: give a SQLite file, sqlite:///PATH or "
                         "postgresql://...")
    if not scheme and text.lower().startswith(tuple(f"{s}:/" for s in POSTGRES_SCHEMES)):
        raise InputError(f"{mask_location(text)!r} is a PostgreSQL URL that lost a '/' (made a path?)")
    return SqliteStore


@dataclass(frozen=True)
class Enrolment:
    """One A-VM to enrol: its public keys, the VM it watches and that VM's gate port.

    ``where`` names it in errors (``file:line`` for an entry of a bulk enrolment file).
    """

    pub: AvmPublic
    vm_id: str
    gate_port: int
    where: str | None = None


class Store:
    """The history of one REM-S: what every backend does, and how to open one.

    ``Store(location)`` opens the backend ``location`` names (see the module's docstring) and brings
    its schema up to date; a database of a newer schema than this VIMS knows is refused.

    Parameters
    ----------
    location : Path or str
        A SQLite file (created, with its tables, if absent), ``sqlite:///PATH`` or ``postgresql://...``.
    create : bool
        Whether a store without REM-S's tables may be created; otherwise it is a user error.
    """

    #: What :class:`Store` reopens the same store with (may hold a password: print :attr:`display`).
    location: Path | str
    #: The location fit to print (no password).
    display: str
    dialect = "sql"
    #: The dialect's two-argument maximum.
    _greatest = "MAX"
    #: The database's clock, in seconds since the epoch: leases are timed by it, one clock for every
    #: verifier process whatever their hosts' clocks say.
    _now = "((julianday('now') - 2440587.5) * 86400.0)"

    @overload
    def __new__(cls, location: Path, *, create: bool = ...) -> SqliteStore: ...

    @overload
    def __new__(cls, location: str | Path, *, create: bool = ...) -> Store: ...

    def __new__(cls, location: str | Path, *, create: bool = True) -> Store:
        return super().__new__(backend(location) if cls is Store else cls)

    # -- what a backend supplies ----------------------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a query (``?`` placeholders); every row as a dict."""
        raise NotImplementedError

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; how many rows it changed."""
        raise NotImplementedError

    def _insert(self, sql: str, params: Sequence[Any]) -> int:
        """Run an INSERT into a table with an ``id`` column; the new row's id."""
        raise NotImplementedError

    def _transaction(self, lock: bool = False) -> contextlib.AbstractContextManager[None]:
        """One transaction; ``lock``: serialised with every other locking one (enrolment, migrations)."""
        raise NotImplementedError

    def _has_table(self, name: str) -> bool:
        raise NotImplementedError

    def _changed(self) -> None:
        """Called in the transaction of an enrolment, revocation or policy (what :meth:`data_version` sees)."""

    def data_version(self) -> int:
        """Changes whenever another connection changed enrolments or policies (how the server notices)."""
        raise NotImplementedError

    def set_busy_timeout(self, seconds: float) -> None:
        """How long one statement waits for a lock held by another connection before it fails."""
        raise NotImplementedError

    def notifications(self) -> Notifications | None:
        """A feed of the changes other processes make, on a connection of its own, or None when the
        backend has none (SQLite: a verifier reads :meth:`data_version` instead)."""
        return None

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self._one(sql, params)
        return None if row is None else next(iter(row.values()))


    # -- A-VMs and policies ---------------------------------------------------------------------------

    def enroll(self, pub: AvmPublic, vm_id: str, gate_port: int, policy: dict[str, Any] | None = None,
               force: bool = False) -> dict[str, Any]:
        """Register an A-VM watching ``vm_id``, whose clients connect through ``gate_port``."""
        return self.enroll_many([Enrolment(pub, vm_id, gate_port)], policy, force)[0]

    def enroll_many(self, entries: Sequence[Enrolment], policy: dict[str, Any] | None = None,
                    force: bool = False) -> list[dict[str, Any]]:
        """Register several A-VMs in one transaction: all of them, or (on the first conflict) none.

        ``policy`` (default: the default policy for a VM that has none, its current one otherwise) is
        given to every VM. A conflict (an A-VM enrolled already without ``force``, a VM, gate port or
        CURVE key taken, by an enrolled A-VM or an earlier entry) raises naming the entry's ``where``.
        """
        pol = normalise_policy(policy or {})
        out = []
        with self._transaction(lock=True):
            for entry in entries:
                try:
                    out.append(self._enroll(entry, pol, policy is not None, force))
                except VimsError as exc:
                    if entry.where is None:
                        raise
                    raise type(exc)(exc.message, where=entry.where) from None
            self._changed()
        return out

    def _enroll(self, entry: Enrolment, policy: dict[str, Any], set_policy: bool, force: bool) -> dict[str, Any]:
        """One enrolment, inside the caller's locking transaction; ``policy`` (normalised) becomes the VM's
        new version when ``set_policy`` or the VM has none."""
        pub, vm_id, gate_port = entry.pub, entry.vm_id, entry.gate_port
        check_id(vm_id, "VM id")
        if not 0 < gate_port < 65536:
            raise InputError(f"gate port {gate_port} is not a TCP port")
        old = self._one("SELECT * FROM avms WHERE avm_id = ?", (pub.avm_id,))
        if old is not None and not force:
            raise VimsError(f"A-VM {pub.avm_id} is already enrolled; pass --force to replace it")
        for row in self._rows("SELECT avm_id, vm_id, gate_port, curve_public FROM avms WHERE revoked_at IS NULL "
                              "AND avm_id != ? AND (vm_id = ? OR gate_port = ? OR curve_public = ?)",
                              (pub.avm_id, vm_id, gate_port, pub.curve_public)):
            if row["vm_id"] == vm_id:
                raise VimsError(f"VM {vm_id} is already watched by A-VM {row['avm_id']} (revoke it first)")
            if row["gate_port"] == gate_port:
                raise VimsError(f"gate port {gate_port} already belongs to VM {row['vm_id']}")
            if row["curve_public"] == pub.curve_public:
                raise VimsError(f"this CURVE key is already enrolled as A-VM {row['avm_id']}")
        self._exec("DELETE FROM avms WHERE avm_id = ?", (pub.avm_id,))
        # A re-enrolled A-VM keeps its sequence number: its old reports must stay unreplayable.
        self._exec(
            "INSERT INTO avms (avm_id, vm_id, curve_public, sign_public, gate_port, enrolled_at, last_seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (pub.avm_id, vm_id, pub.curve_public, pub.sign_public, gate_port, time.time(),
             old["last_seq"] if old is not None else 0))
        latest = self._latest(vm_id)
        version = self._add_policy(vm_id, policy) if set_policy or latest is None else latest
        return {"avm_id": pub.avm_id, "vm_id": vm_id, "gate_port": gate_port, "policy_version": version}

    def revoke(self, avm_id: str) -> None:
        with self._transaction():
            changed = self._exec("UPDATE avms SET revoked_at = ? WHERE avm_id = ? AND revoked_at IS NULL",
                                 (time.time(), avm_id))
            if changed:
                self._changed()
        if changed == 0:
            raise VimsError(f"no enrolled, unrevoked A-VM {avm_id!r}")

    def avms(self) -> list[dict[str, Any]]:
        """Every A-VM ever enrolled, revoked ones too."""
        return self._rows("SELECT * FROM avms ORDER BY avm_id")

    def _latest(self, vm_id: str) -> int | None:
        latest = self._value("SELECT MAX(version) AS latest FROM policies WHERE vm_id = ?", (vm_id,))
        return None if latest is None else int(latest)

    def _add_policy(self, vm_id: str, policy: dict[str, Any]) -> int:
        version = (self._latest(vm_id) or 0) + 1
        policy = {k: v for k, v in policy.items() if k != "version"}
        self._exec("INSERT INTO policies (vm_id, version, policy, created_at) VALUES (?, ?, ?, ?)",
                   (vm_id, version, json.dumps(policy, sort_keys=True), time.time()))
        return version

    def set_policy(self, vm_id: str, policy: dict[str, Any], where: str = "policy") -> int:
        """Store a new policy version for ``vm_id`` (a running server pushes it); return the version."""
        pol = normalise_policy(policy, where)
        with self._transaction(lock=True):
            if self._latest(vm_id) is None:
                raise VimsError(f"no VM {vm_id!r} is enrolled")
            version = self._add_policy(vm_id, pol)
            self._changed()
        return version

    def policy(self, vm_id: str) -> dict[str, Any]:
        """The current policy of ``vm_id``, with its ``version``."""
        row = self._one("SELECT version, policy FROM policies WHERE vm_id = ? ORDER BY version DESC LIMIT 1",
                        (vm_id,))
        if row is None:
            raise VimsError(f"no VM {vm_id!r} is enrolled")
        return {**json.loads(row["policy"]), "version": int(row["version"])}

    def record_hello(self, avm_id: str, capabilities: Any) -> None:
        self._exec("UPDATE avms SET capabilities = ?, last_hello = ? WHERE avm_id = ?",
                   (json.dumps(capabilities)[:65536], time.time(), avm_id))

    def record_ack(self, avm_id: str, version: int) -> None:
        self._exec("UPDATE avms SET acked_version = ? WHERE avm_id = ?", (version, avm_id))

    # -- reports and decisions ------------------------------------------------------------------------

    def record_report(self, *, avm_id: str | None, vm_id: str | None, seq: int | None, status: str,
                      reason: str | None = None, detail: str | None = None, nonce: str | None = None,
                      score: float | None = None, verdict: str | None = None, digest: str | None = None,
                      document: str | None = None, received_at: float | None = None) -> int:
        """Append a report (accepted or not); an accepted one also advances the A-VM's ``last_seq``."""
        with self._transaction():
            report_id = self._insert(
                "INSERT INTO reports (received_at, avm_id, vm_id, seq, status, reason, detail, nonce, score, "
                "verdict, digest, document) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (received_at or time.time(), avm_id, vm_id, seq, status, reason, detail, nonce, score, verdict,
                 digest, document))
            if status == "accepted":
                self._exec(f"UPDATE avms SET last_seq = {self._greatest}(last_seq, ?) WHERE avm_id = ?",
                           (seq, avm_id))
        return report_id

    # -- verifiers and their leases on A-VMs ----------------------------------------------------------
    #
    # Several verifier processes (``vims remote serve``) may share one store. Each A-VM's reports are
    # accepted by one verifier at a time: the one holding its lease, a row of ``leases`` renewed by that
    # verifier's heartbeat and timed by the database's clock. A lease is taken over only when it is free
    # or expired, in one statement (an upsert whose update is conditional), so two verifiers never both
    # hold one. Accepting a report renews its lease in the same transaction that records it.

    def _take_lease_sql(self) -> str:
        now = self._now
        return (f"INSERT INTO leases (avm_id, verifier_id, acquired_at, renewed_at, expires_at, generation) "
                f"VALUES (?, ?, {now}, {now}, {now} + ?, 1) ON CONFLICT (avm_id) DO UPDATE SET "
                "acquired_at = CASE WHEN leases.verifier_id = excluded.verifier_id THEN leases.acquired_at "
                "ELSE excluded.acquired_at END, "
                "generation = CASE WHEN leases.verifier_id = excluded.verifier_id THEN leases.generation "
                "ELSE leases.generation + 1 END, "
                "verifier_id = excluded.verifier_id, renewed_at = excluded.renewed_at, "
                "expires_at = excluded.expires_at "
                "WHERE leases.verifier_id = excluded.verifier_id OR leases.expires_at < excluded.renewed_at")

    def take_lease(self, avm_id: str, verifier_id: str, lease_s: float) -> bool:
        """Take (or renew) the lease of ``avm_id`` for ``lease_s`` seconds; False when another verifier
        holds it unexpired (nothing changes then)."""
        with self._transaction():
            return self._exec(self._take_lease_sql(), (avm_id, verifier_id, float(lease_s))) == 1

    def heartbeat(self, verifier_id: str, lease_s: float, keep: Sequence[str], release: Sequence[str] = (),
                  endpoint: str | None = None) -> set[str]:
        """One heartbeat of a verifier: record it alive, renew or take the leases of ``keep`` (the A-VMs
        talking to it), give up those of ``release``; return the A-VMs among ``keep`` it holds now.

        A lease held by another verifier and not expired is left alone (the A-VM counts as not held).
        """
        held: set[str] = set()
        sql = self._take_lease_sql()
        with self._transaction():
            now = self._value(f"SELECT {self._now} AS now")
            if not self._exec("UPDATE verifiers SET heartbeat_at = ?, lease_s = ?, stopped_at = NULL, "
                              "endpoint = COALESCE(?, endpoint) WHERE verifier_id = ?",
                              (now, float(lease_s), endpoint, verifier_id)):
                import socket

                self._exec("INSERT INTO verifiers (verifier_id, endpoint, host, pid, lease_s, started_at, "
                           "heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (verifier_id, endpoint, socket.gethostname(), os.getpid(), float(lease_s), now, now))
            for avm_id in keep:
                if self._exec(sql, (avm_id, verifier_id, float(lease_s))) == 1:
                    held.add(avm_id)
            for avm_id in release:
                self._exec("DELETE FROM leases WHERE avm_id = ? AND verifier_id = ?", (avm_id, verifier_id))
        return held

    def stop_verifier(self, verifier_id: str) -> int:
        """A verifier that stops cleanly: its leases are given up at once (others take its A-VMs over
        without waiting for them to expire). Returns how many it held."""
        with self._transaction():
            n = self._exec("DELETE FROM leases WHERE verifier_id = ?", (verifier_id,))
            self._exec(f"UPDATE verifiers SET stopped_at = {self._now} WHERE verifier_id = ?", (verifier_id,))
        return n

    def lease_holder(self, avm_id: str) -> dict[str, Any] | None:
        """Who holds ``avm_id``'s lease now (``verifier_id``, ``generation``, ``expires_in_s``), or None
        when it is free or expired."""
        return self._one(f"SELECT verifier_id, generation, expires_at - {self._now} AS expires_in_s FROM leases "
                         f"WHERE avm_id = ? AND expires_at >= {self._now}", (avm_id,))

    def leases(self) -> list[dict[str, Any]]:
        """The lease table, for ``vims remote status``: one row per A-VM with a lease (expired ones too).

        Each row: ``avm_id``, ``vm_id``, ``verifier_id``, ``endpoint`` (the verifier's control channel),
        ``generation`` (changes of holder), ``age_s`` (since this verifier took it), ``renewed_s_ago``,
        ``expires_in_s`` (negative: expired, free to take), ``verifier_heartbeat_s_ago``, ``expired``;
        ages by the database's clock, whose readings ``acquired_at``, ``renewed_at``, ``expires_at`` also are.
        """
        now = self._now
        rows = self._rows(
            "SELECT l.avm_id, a.vm_id, l.verifier_id, v.endpoint, l.generation, l.acquired_at, l.renewed_at, "
            f"l.expires_at, {now} - l.acquired_at AS age_s, "
            f"{now} - l.renewed_at AS renewed_s_ago, l.expires_at - {now} AS expires_in_s, "
            f"{now} - v.heartbeat_at AS verifier_heartbeat_s_ago FROM leases l "
            "LEFT JOIN avms a ON a.avm_id = l.avm_id LEFT JOIN verifiers v ON v.verifier_id = l.verifier_id "
            "ORDER BY l.avm_id")
        for row in rows:
            row["expired"] = row["expires_in_s"] < 0
        return rows

    def verifiers(self, live_only: bool = False) -> list[dict[str, Any]]:
        """The verifier processes that used this store: id, endpoint, host, pid, lease period, heartbeat
        age (``heartbeat_s_ago``), whether it stopped cleanly, and how many leases it holds unexpired.
        ``live_only``: only those running (not stopped, a heartbeat within their lease period)."""
        now = self._now
        rows = self._rows(
            f"SELECT v.verifier_id, v.endpoint, v.host, v.pid, v.lease_s, {now} - v.heartbeat_at AS heartbeat_s_ago, "
            "v.stopped_at, (SELECT COUNT(*) FROM leases l WHERE l.verifier_id = v.verifier_id "
            f"AND l.expires_at >= {now}) AS leases FROM verifiers v ORDER BY v.verifier_id")
        if live_only:
            rows = [r for r in rows if r["stopped_at"] is None and r["heartbeat_s_ago"] <= r["lease_s"]]
        return rows

    def accept_report(self, *, verifier_id: str, lease_s: float, avm_id: str, vm_id: str, seq: int,
                      nonce: str | None, score: float | None, verdict: str, detail: str | None,
                      digest: str, document: str | None, received_at: float) -> tuple[int, str | None, str]:
        """Record an accepted report, only while ``verifier_id`` holds (or can take) the A-VM's lease and
        ``seq`` is newer than every report accepted of it, by any verifier; all in one transaction.

        Returns ``(report_id, None, "")``, or ``(0, reason, detail)`` with nothing recorded: reason
        ``not_leaseholder`` (another verifier holds the lease) or ``out_of_sequence``.
        """
        with self._transaction():
            return self._accept(verifier_id=verifier_id, lease_s=lease_s, avm_id=avm_id, vm_id=vm_id, seq=seq,
                                nonce=nonce, score=score, verdict=verdict, detail=detail, digest=digest,
                                document=document, received_at=received_at)

    def accept_reports(self, reports: Sequence[dict[str, Any]]) -> list[tuple[int, str | None, str] | Exception]:
        """:meth:`accept_report` for several reports (each a dict of its arguments) in one transaction,
        so one commit (one flush to disk) serves them all; in order, each in a savepoint of its own.

        Returns one result per report, as :meth:`accept_report` gives it, or the error that report's
        statements raised (that report is rolled back, the others stay). An error outside them (the
        connection lost, the commit refused) raises: then none was recorded.
        """
        results: list[tuple[int, str | None, str] | Exception] = []
        with self._transaction():
            for kwargs in reports:
                try:
                    with self._savepoint():
                        results.append(self._accept(**kwargs))
                except (sqlite3.Error, StoreError) as exc:
                    results.append(exc)
        return results

    @contextlib.contextmanager
    def _savepoint(self) -> Iterator[None]:
        """A savepoint inside the current transaction: rolled back to when the block raises."""
        self._exec("SAVEPOINT vims_one")
        try:
            yield
        except BaseException:
            self._exec("ROLLBACK TO SAVEPOINT vims_one")
            self._exec("RELEASE SAVEPOINT vims_one")
            raise
        self._exec("RELEASE SAVEPOINT vims_one")

    def _accept(self, *, verifier_id: str, lease_s: float, avm_id: str, vm_id: str, seq: int, nonce: str | None,
                score: float | None, verdict: str, detail: str | None, digest: str, document: str | None,
                received_at: float) -> tuple[int, str | None, str]:
        """The statements of :meth:`accept_report`, in the caller's transaction."""
        if self._exec(self._take_lease_sql(), (avm_id, verifier_id, float(lease_s))) != 1:
            holder = self._value("SELECT verifier_id FROM leases WHERE avm_id = ?", (avm_id,))
            return 0, "not_leaseholder", f"A-VM {avm_id}'s lease is held by verifier {holder}"
        if self._exec("UPDATE avms SET last_seq = ? WHERE avm_id = ? AND last_seq < ?",
                      (seq, avm_id, seq)) != 1:
            last = self._value("SELECT last_seq FROM avms WHERE avm_id = ?", (avm_id,))
            return 0, "out_of_sequence", f"seq {seq} <= last accepted {last} (by any verifier)"
        report_id = self._insert(
            "INSERT INTO reports (received_at, avm_id, vm_id, seq, status, reason, detail, nonce, score, "
            "verdict, digest, document, verifier_id) VALUES (?, ?, ?, ?, 'accepted', NULL, ?, ?, ?, ?, ?, ?, ?)",
            (received_at, avm_id, vm_id, seq, detail, nonce, score, verdict, digest, document, verifier_id))
        return report_id, None, ""

    def last_seq(self, avm_id: str) -> int:
        """The newest sequence number accepted of ``avm_id`` (by any verifier)."""
        return int(self._value("SELECT last_seq FROM avms WHERE avm_id = ?", (avm_id,)) or 0)

    def latest_verdict(self, vm_id: str) -> dict[str, Any] | None:
        """The latest accepted report of ``vm_id``, whichever verifier accepted it: ``seq``, ``verdict``
        (allow | deny), ``detail`` (the policy's reason), ``verifier_id``, ``avm_id``, ``id``; with its A-VM's
        lease holder now (``holder``, None when free or expired). What a gate decides from."""
        row = self._one("SELECT id, avm_id, seq, verdict, detail, verifier_id FROM reports "
                        "WHERE vm_id = ? AND status = 'accepted' ORDER BY id DESC LIMIT 1", (vm_id,))
        if row is None:
            return None
        holder = self.lease_holder(row["avm_id"]) if row["avm_id"] else None
        row["holder"] = holder["verifier_id"] if holder else None
        return row

    def prune(self, limits: dict[str, tuple[float, int]], max_unattributed: int = MAX_UNATTRIBUTED,
              now: float | None = None, max_days: float | None = None) -> dict[str, int]:
        """Keep the history bounded: apply each VM's retention, cap the rows no VM owns.

        ``limits`` maps a vm_id to ``(days, documents)`` (its policy's ``history_days`` and
        ``history_documents``; :func:`~vims.remote.policy.retention`): its reports and decisions older
        than ``days`` (or ``max_days``, the operator's cap, when shorter) are deleted, and only its latest
        ``documents`` reports keep their signed document (the rest keep their digest, verdict and
        reason). VMs with rows but not in ``limits`` (no longer enrolled) take the default policy's
        limits. Rows that name no VM (refused keys) are capped at the newest ``max_unattributed``.

        However old, what the gates and the status decide from is kept: the VM's latest accepted report
        (:meth:`latest_verdict`) and, for each A-VM that reported on it, its latest accepted report and
        its latest report of any status, and the VM's latest decision. Verifiers that stopped or fell
        silent before the cut-off and hold no lease are forgotten. Returns how many rows were deleted
        (``reports``, ``decisions``, ``unattributed``, ``verifiers``) and documents dropped.
        """
        from vims.remote.policy import DEFAULT_POLICY, retention

        now = time.time() if now is None else now
        default = retention(DEFAULT_POLICY)
        vms = {r["vm_id"] for r in self._rows("SELECT DISTINCT vm_id FROM reports WHERE vm_id IS NOT NULL")}
        vms |= {r["vm_id"] for r in self._rows("SELECT DISTINCT vm_id FROM decisions")}
        out = {"reports": 0, "decisions": 0, "documents": 0, "unattributed": 0, "verifiers": 0}
        longest = 0.0
        with self._transaction():
            for vm_id in sorted(vms):
                days, documents = limits.get(vm_id, default)
                days = days if max_days is None else min(days, max_days)
                longest = max(longest, days)
                before = now - days * 86400.0
                out["reports"] += self._exec(
                    "DELETE FROM reports WHERE vm_id = ? AND received_at < ? AND id NOT IN ("
                    "SELECT MAX(id) FROM reports WHERE vm_id = ? AND status = 'accepted' GROUP BY avm_id "
                    "UNION SELECT MAX(id) FROM reports WHERE vm_id = ? AND avm_id IS NOT NULL GROUP BY avm_id)",
                    (vm_id, before, vm_id, vm_id))
                out["decisions"] += self._exec(
                    "DELETE FROM decisions WHERE vm_id = ? AND time < ? AND id < "
                    "(SELECT MAX(id) FROM decisions WHERE vm_id = ?)", (vm_id, before, vm_id))
                out["documents"] += self._exec(
                    "UPDATE reports SET document = NULL WHERE vm_id = ? AND document IS NOT NULL AND id <= "
                    "(SELECT id FROM reports WHERE vm_id = ? AND document IS NOT NULL ORDER BY id DESC "
                    "LIMIT 1 OFFSET ?)", (vm_id, vm_id, documents))
            out["unattributed"] = self._exec(
                "DELETE FROM reports WHERE vm_id IS NULL AND id <= (SELECT id FROM reports WHERE vm_id IS NULL "
                "ORDER BY id DESC LIMIT 1 OFFSET ?)", (max_unattributed,))
            keep_s = max(longest, default[0] if max_days is None else min(default[0], max_days)) * 86400.0
            out["verifiers"] = self._exec(
                "DELETE FROM verifiers WHERE heartbeat_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM leases l WHERE l.verifier_id = verifiers.verifier_id)", (now - keep_s,))
        return out

    def seen_report(self, avm_id: str, seq: int, digest: str) -> bool:
        """Whether this very report (same A-VM, seq and content) was accepted before."""
        return self._one("SELECT 1 AS seen FROM reports WHERE avm_id = ? AND seq = ? AND digest = ? "
                         "AND status = 'accepted' LIMIT 1", (avm_id, seq, digest)) is not None

    def record_decision(self, *, vm_id: str, conn_id: str, kind: str, reason: str, peer: str | None = None,
                        latency_s: float | None = None, report_seq: int | None = None,
                        at: float | None = None) -> None:
        self._exec("INSERT INTO decisions (time, vm_id, conn_id, kind, reason, peer, latency_s, report_seq) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (at or time.time(), vm_id, conn_id, kind, reason, peer, latency_s, report_seq))

    # -- reading --------------------------------------------------------------------------------------

    def history(self, vm_id: str, limit: int = 50, before: int | None = None) -> dict[str, Any]:
        """The latest ``limit`` reports and decisions of ``vm_id`` (newest first); ``before``: ids below it."""
        below = 2**62 if before is None else before
        reports = self._rows(
            "SELECT id, received_at, avm_id, seq, status, reason, detail, nonce, score, verdict FROM reports "
            "WHERE vm_id = ? AND id < ? ORDER BY id DESC LIMIT ?", (vm_id, below, limit))
        decisions = self._rows(
            "SELECT id, time, conn_id, kind, reason, peer, latency_s, report_seq FROM decisions "
            "WHERE vm_id = ? AND id < ? ORDER BY id DESC LIMIT ?", (vm_id, below, limit))
        return {"vm_id": vm_id, "reports": reports, "decisions": decisions}

    def latest_document(self, vm_id: str) -> dict[str, Any] | None:
        """The newest accepted report of ``vm_id`` that still has its signed document (id, time, document)."""
        return self._one("SELECT id, received_at, document FROM reports WHERE vm_id = ? AND status = 'accepted' "
                         "AND document IS NOT NULL ORDER BY id DESC LIMIT 1", (vm_id,))

    def decisions(self, search: str = "", limit: int = 100) -> list[dict[str, Any]]:
        """The latest ``limit`` decisions on any VM (newest first) whose VM, kind, reason, connection or peer
        contains ``search`` (any case)."""
        pattern = "%" + search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        cols = " || ' ' || ".join(f"LOWER(COALESCE({c}, ''))" for c in ("vm_id", "kind", "reason", "conn_id", "peer"))
        return self._rows(
            "SELECT id, time, vm_id, conn_id, kind, reason, peer, latency_s, report_seq FROM decisions "
            f"WHERE {cols} LIKE ? ESCAPE '\\' ORDER BY id DESC LIMIT ?", (pattern, limit))

    def counts(self) -> dict[str, Any]:
        """Totals: reports by status and reason, decisions by kind."""
        reports = {r["status"] + (f":{r['reason']}" if r["reason"] else ""): r["n"] for r in self._rows(
            "SELECT status, reason, COUNT(*) AS n FROM reports GROUP BY status, reason")}
        decisions = {r["kind"]: r["n"] for r in self._rows(
            "SELECT kind, COUNT(*) AS n FROM decisions GROUP BY kind")}
        return {"reports": reports, "decisions": decisions}

    def status(self) -> list[dict[str, Any]]:
        """One row per A-VM: its VM, gate port, policy, last report and last decision."""
        rows = []
        for a in self.avms():
            last = self._one("SELECT received_at, status, reason, score, verdict FROM reports "
                             "WHERE avm_id = ? ORDER BY id DESC LIMIT 1", (a["avm_id"],))
            dec = self._one("SELECT time, kind, reason FROM decisions WHERE vm_id = ? ORDER BY id DESC LIMIT 1",
                            (a["vm_id"],))
            rows.append({
                "avm_id": a["avm_id"], "vm_id": a["vm_id"], "gate_port": a["gate_port"],
                "revoked": a["revoked_at"] is not None, "enrolled_at": a["enrolled_at"],
                "policy_version": self._latest(a["vm_id"]), "acked_version": a["acked_version"],
                "last_seq": a["last_seq"], "last_hello": a["last_hello"],
                "last_report": last, "last_decision": dec,
            })
        return rows


class SqliteStore(Store):
    """The history in one SQLite file (WAL): the embedded default for one machine.

    Parameters
    ----------
    location : Path or str
        The database file (or ``sqlite:///PATH``); created, with its tables, if absent and ``create``.
    create : bool
        Whether a missing file may be created (otherwise: a user error naming ``vims remote init``).
    """

    dialect = "sqlite"

    def __init__(self, location: Path | str, *, create: bool = True) -> None:
        text = os.fspath(location)
        self.path = Path(text[len("sqlite://"):] if text.lower().startswith("sqlite://") else text)
        self.location, self.display = self.path, str(self.path)
        if not create and not self.path.exists():
            raise VimsError(f"no REM-S database at {self.path} (run `vims remote init` first)")
        # Reports, command lines and nonces are private: the home 0700, the database (and WAL) 0600.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            self.db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            migrate(self)
            for suffix in ("", "-wal", "-shm"):
                part = Path(f"{self.path}{suffix}")
                if part.exists() and part.stat().st_uid == os.getuid():
                    os.chmod(part, 0o600)
        except sqlite3.DatabaseError as exc:
            raise InputError(f"not a REM-S database: {exc}", where=self.path) from exc

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute(sql, params)]

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self.db.execute(sql, params).rowcount)

    def _insert(self, sql: str, params: Sequence[Any]) -> int:
        return int(self.db.execute(sql, params).lastrowid or 0)

    @contextlib.contextmanager
    def _transaction(self, lock: bool = False) -> Iterator[None]:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE" if lock else "BEGIN")
            yield

    def _has_table(self, name: str) -> bool:
        return self._one("SELECT 1 AS present FROM sqlite_master WHERE type = 'table' AND name = ?",
                         (name,)) is not None

    def data_version(self) -> int:
        """Changes whenever another connection commits (how the server notices the CLI's edits)."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def set_busy_timeout(self, seconds: float) -> None:
        self.db.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")

    def close(self) -> None:
        self.db.close()

