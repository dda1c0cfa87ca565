"""REM-S's history: A-VMs, policies, every report and every decision, in one SQLite file (WAL).

Each write is its own committed transaction, so a restart (or a crash of REM-S) loses nothing that
was answered. The command-line tools open the same file while ``vims remote serve`` runs: a policy
set or an A-VM revoked there is picked up by the server, which watches ``PRAGMA data_version``.

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

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from vims.errors import InputError, VimsError
from vims.remote.keys import AvmPublic, check_id
from vims.remote.policy import normalise_policy

SCHEMA = """
CREATE TABLE IF NOT EXISTS avms (
    avm_id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    curve_public TEXT NOT NULL UNIQUE,
    sign_public TEXT NOT NULL,
    gate_port INTEGER NOT NULL,
    enrolled_at REAL NOT NULL,
    revoked_at REAL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    acked_version INTEGER,
    capabilities TEXT,
    last_hello REAL
);
CREATE TABLE IF NOT EXISTS policies (
    vm_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    policy TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (vm_id, version)
);
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    avm_id TEXT,
    vm_id TEXT,
    seq INTEGER,
    status TEXT NOT NULL,          -- accepted | rejected
    reason TEXT,                   -- a REJECT_REASONS entry when rejected
    detail TEXT,
    nonce TEXT,
    score REAL,
    verdict TEXT,                  -- allow | deny: the policy's verdict on an accepted report
    digest TEXT,
    document TEXT
);
CREATE INDEX IF NOT EXISTS reports_avm_seq ON reports (avm_id, seq);
CREATE INDEX IF NOT EXISTS reports_vm ON reports (vm_id, received_at);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    vm_id TEXT NOT NULL,
    conn_id TEXT NOT NULL,
    kind TEXT NOT NULL,            -- allow | deny | cut
    reason TEXT NOT NULL,
    peer TEXT,
    latency_s REAL,                -- connect to decision (allow/deny); open time (cut)
    report_seq INTEGER
);
CREATE INDEX IF NOT EXISTS decisions_vm ON decisions (vm_id, time);
"""


class Store:
    """The SQLite history of one REM-S.

    Parameters
    ----------
    path : Path
        The database file; created (with its tables) if absent.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # Reports, command lines and nonces are private: the home 0700, the database (and WAL) 0600.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            self.db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            for suffix in ("", "-wal", "-shm"):
                part = Path(f"{self.path}{suffix}")
                if part.exists() and part.stat().st_uid == os.getuid():
                    os.chmod(part, 0o600)
        except sqlite3.DatabaseError as exc:
            raise InputError(f"not a REM-S database: {exc}", where=self.path) from exc

    def close(self) -> None:
        self.db.close()

    def data_version(self) -> int:
        """Changes whenever another connection commits (how the server notices the CLI's edits)."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    # -- A-VMs and policies ---------------------------------------------------------------------------

    def enroll(self, pub: AvmPublic, vm_id: str, gate_port: int, policy: dict[str, Any] | None = None,
               force: bool = False) -> dict[str, Any]:
        """Register an A-VM watching ``vm_id``, whose clients connect through ``gate_port``."""
        check_id(vm_id, "VM id")
        if not 0 < gate_port < 65536:
            raise InputError(f"gate port {gate_port} is not a TCP port")
        pol = normalise_policy(policy or {})
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            old = self.db.execute("SELECT * FROM avms WHERE avm_id = ?", (pub.avm_id,)).fetchone()
            if old is not None and not force:
                raise VimsError(f"A-VM {pub.avm_id} is already enrolled; pass --force to replace it")
            for row in self.db.execute("SELECT avm_id, vm_id, gate_port, curve_public FROM avms "
                                       "WHERE revoked_at IS NULL AND avm_id != ?", (pub.avm_id,)):
                if row["vm_id"] == vm_id:
                    raise VimsError(f"VM {vm_id} is already watched by A-VM {row['avm_id']} (revoke it first)")
                if row["gate_port"] == gate_port:
                    raise VimsError(f"gate port {gate_port} already belongs to VM {row['vm_id']}")
                if row["curve_public"] == pub.curve_public:
                    raise VimsError(f"this CURVE key is already enrolled as A-VM {row['avm_id']}")
            self.db.execute("DELETE FROM avms WHERE avm_id = ?", (pub.avm_id,))
            # A re-enrolled A-VM keeps its sequence number: its old reports must stay unreplayable.
            self.db.execute(
                "INSERT INTO avms (avm_id, vm_id, curve_public, sign_public, gate_port, enrolled_at, last_seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (pub.avm_id, vm_id, pub.curve_public, pub.sign_public, gate_port, time.time(),
                 old["last_seq"] if old is not None else 0))
            version = self._add_policy(vm_id, pol) if policy is not None or self._latest(vm_id) is None \
                else self._latest(vm_id)
        return {"avm_id": pub.avm_id, "vm_id": vm_id, "gate_port": gate_port, "policy_version": version}

    def revoke(self, avm_id: str) -> None:
        with self.db:
            cur = self.db.execute("UPDATE avms SET revoked_at = ? WHERE avm_id = ? AND revoked_at IS NULL",
                                  (time.time(), avm_id))
        if cur.rowcount == 0:
            raise VimsError(f"no enrolled, unrevoked A-VM {avm_id!r}")

    def avms(self) -> list[dict[str, Any]]:
        """Every A-VM ever enrolled, revoked ones too."""
        return [dict(r) for r in self.db.execute("SELECT * FROM avms ORDER BY avm_id")]

    def _latest(self, vm_id: str) -> int | None:
        row = self.db.execute("SELECT MAX(version) FROM policies WHERE vm_id = ?", (vm_id,)).fetchone()
        return None if row[0] is None else int(row[0])

    def _add_policy(self, vm_id: str, policy: dict[str, Any]) -> int:
        version = (self._latest(vm_id) or 0) + 1
        policy = {k: v for k, v in policy.items() if k != "version"}
        self.db.execute("INSERT INTO policies VALUES (?, ?, ?, ?)",
                        (vm_id, version, json.dumps(policy, sort_keys=True), time.time()))
        return version

    def set_policy(self, vm_id: str, policy: dict[str, Any], where: str = "policy") -> int:
        """Store a new policy version for ``vm_id`` (a running server pushes it); return the version."""
        pol = normalise_policy(policy, where)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if self._latest(vm_id) is None:
                raise VimsError(f"no VM {vm_id!r} is enrolled")
            return self._add_policy(vm_id, pol)

    def policy(self, vm_id: str) -> dict[str, Any]:
        """The current policy of ``vm_id``, with its ``version``."""
        row = self.db.execute("SELECT version, policy FROM policies WHERE vm_id = ? ORDER BY version DESC "
                              "LIMIT 1", (vm_id,)).fetchone()
        if row is None:
            raise VimsError(f"no VM {vm_id!r} is enrolled")
        return {**json.loads(row["policy"]), "version": int(row["version"])}

    def record_hello(self, avm_id: str, capabilities: Any) -> None:
        with self.db:
            self.db.execute("UPDATE avms SET capabilities = ?, last_hello = ? WHERE avm_id = ?",
                            (json.dumps(capabilities)[:65536], time.time(), avm_id))

    def record_ack(self, avm_id: str, version: int) -> None:
        with self.db:
            self.db.execute("UPDATE avms SET acked_version = ? WHERE avm_id = ?", (version, avm_id))

    # -- reports and decisions ------------------------------------------------------------------------

    def record_report(self, *, avm_id: str | None, vm_id: str | None, seq: int | None, status: str,
                      reason: str | None = None, detail: str | None = None, nonce: str | None = None,
                      score: float | None = None, verdict: str | None = None, digest: str | None = None,
                      document: str | None = None, received_at: float | None = None) -> int:
        """Append a report (accepted or not); an accepted one also advances the A-VM's ``last_seq``."""
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute(
                "INSERT INTO reports (received_at, avm_id, vm_id, seq, status, reason, detail, nonce, score, "
                "verdict, digest, document) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (received_at or time.time(), avm_id, vm_id, seq, status, reason, detail, nonce, score, verdict,
                 digest, document))
            if status == "accepted":
                self.db.execute("UPDATE avms SET last_seq = MAX(last_seq, ?) WHERE avm_id = ?", (seq, avm_id))
        return int(cur.lastrowid or 0)

    def prune(self, limits: dict[str, tuple[float, int]], max_unattributed: int,
              now: float | None = None) -> dict[str, int]:
        """Keep the history bounded: apply each VM's retention, cap the rows no VM owns.

        ``limits`` maps a vm_id to ``(days, documents)`` (its policy's ``history_days`` and
        ``history_documents``): its reports and decisions older than ``days`` are deleted, and only its
        latest ``documents`` reports keep their signed document (the rest keep their digest, verdict and
        reason). VMs with rows but not in ``limits`` (no longer enrolled) take the default policy's
        limits. Rows that name no VM (refused keys) are capped at the newest ``max_unattributed``.
        Returns how many rows were deleted and documents dropped.
        """
        from vims.remote.policy import DEFAULT_POLICY

        now = time.time() if now is None else now
        default = (float(DEFAULT_POLICY["history_days"]), int(DEFAULT_POLICY["history_documents"]))
        vms = {r[0] for r in self.db.execute("SELECT DISTINCT vm_id FROM reports WHERE vm_id IS NOT NULL")}
        vms |= {r[0] for r in self.db.execute("SELECT DISTINCT vm_id FROM decisions")}
        out = {"reports": 0, "decisions": 0, "documents": 0, "unattributed": 0}
        with self.db:
            self.db.execute("BEGIN")
            for vm_id in sorted(vms):
                days, documents = limits.get(vm_id, default)
                before = now - days * 86400.0
                out["reports"] += self.db.execute("DELETE FROM reports WHERE vm_id = ? AND received_at < ?",
                                                  (vm_id, before)).rowcount
                out["decisions"] += self.db.execute("DELETE FROM decisions WHERE vm_id = ? AND time < ?",
                                                    (vm_id, before)).rowcount
                out["documents"] += self.db.execute(
                    "UPDATE reports SET document = NULL WHERE vm_id = ? AND document IS NOT NULL AND id <= "
                    "(SELECT id FROM reports WHERE vm_id = ? AND document IS NOT NULL ORDER BY id DESC "
                    "LIMIT 1 OFFSET ?)", (vm_id, vm_id, documents)).rowcount
            out["unattributed"] = self.db.execute(
                "DELETE FROM reports WHERE vm_id IS NULL AND id <= (SELECT id FROM reports WHERE vm_id IS NULL "
                "ORDER BY id DESC LIMIT 1 OFFSET ?)", (max_unattributed,)).rowcount
        return out

    def seen_report(self, avm_id: str, seq: int, digest: str) -> bool:
        """Whether this very report (same A-VM, seq and content) was accepted before."""
        row = self.db.execute("SELECT 1 FROM reports WHERE avm_id = ? AND seq = ? AND digest = ? "
                              "AND status = 'accepted' LIMIT 1", (avm_id, seq, digest)).fetchone()
        return row is not None

    def record_decision(self, *, vm_id: str, conn_id: str, kind: str, reason: str, peer: str | None = None,
                        latency_s: float | None = None, report_seq: int | None = None,
                        at: float | None = None) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO decisions (time, vm_id, conn_id, kind, reason, peer, latency_s, report_seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (at or time.time(), vm_id, conn_id, kind, reason, peer, latency_s, report_seq))

    # -- reading --------------------------------------------------------------------------------------

    def history(self, vm_id: str, limit: int = 50) -> dict[str, Any]:
        """The latest ``limit`` reports and decisions of ``vm_id`` (newest first)."""
        reports = [dict(r) for r in self.db.execute(
            "SELECT id, received_at, avm_id, seq, status, reason, detail, nonce, score, verdict FROM reports "
            "WHERE vm_id = ? ORDER BY id DESC LIMIT ?", (vm_id, limit))]
        decisions = [dict(r) for r in self.db.execute(
            "SELECT id, time, conn_id, kind, reason, peer, latency_s, report_seq FROM decisions "
            "WHERE vm_id = ? ORDER BY id DESC LIMIT ?", (vm_id, limit))]
        return {"vm_id": vm_id, "reports": reports, "decisions": decisions}

    def counts(self) -> dict[str, Any]:
        """Totals: reports by status and reason, decisions by kind."""
        reports = {f"{r[0]}" + (f":{r[1]}" if r[1] else ""): r[2] for r in self.db.execute(
            "SELECT status, reason, COUNT(*) FROM reports GROUP BY status, reason")}
        decisions = {r[0]: r[1] for r in self.db.execute("SELECT kind, COUNT(*) FROM decisions GROUP BY kind")}
        return {"reports": reports, "decisions": decisions}

    def status(self) -> list[dict[str, Any]]:
        """One row per A-VM: its VM, gate port, policy, last report and last decision."""
        rows = []
        for a in self.avms():
            last = self.db.execute("SELECT received_at, status, reason, score, verdict FROM reports "
                                   "WHERE avm_id = ? ORDER BY id DESC LIMIT 1", (a["avm_id"],)).fetchone()
            dec = self.db.execute("SELECT time, kind, reason FROM decisions WHERE vm_id = ? ORDER BY id DESC "
                                  "LIMIT 1", (a["vm_id"],)).fetchone()
            rows.append({
                "avm_id": a["avm_id"], "vm_id": a["vm_id"], "gate_port": a["gate_port"],
                "revoked": a["revoked_at"] is not None, "enrolled_at": a["enrolled_at"],
                "policy_version": self._latest(a["vm_id"]), "acked_version": a["acked_version"],
                "last_seq": a["last_seq"], "last_hello": a["last_hello"],
                "last_report": dict(last) if last else None, "last_decision": dict(dec) if dec else None,
            })
        return rows
