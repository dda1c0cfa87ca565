"""REM-S's store on both backends: the same operations give the same results on SQLite and PostgreSQL.

PostgreSQL is a real server (tests/postgres_fixture.py); each test gets a fresh schema. Also: the
schema's migrations (a SQLite file of the schema before migrations opens and is migrated; a newer
schema is refused), and PostgreSQL's faults (a connection killed mid-run fails the next operation
with a clear StoreError, and the one after reconnects).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.postgres_fixture import postgres_server, postgres_url  # noqa: F401  (fixtures)
from vims.errors import InputError, VimsError
from vims.remote.keys import AvmIdentity
from vims.remote.store import SqliteStore, Store, StoreError, backend
from vims.remote.store_migrations import _SQLITE_V1, MIGRATIONS, Migration, migrate, schema_version

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def location(request, tmp_path):
    """Where a fresh store is, on each backend."""
    if request.param == "sqlite":
        return tmp_path / "rems.sqlite"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(location):
    s = Store(location)
    yield s
    s.close()


def test_the_location_picks_the_backend(tmp_path):
    assert backend(tmp_path / "a.sqlite") is SqliteStore
    assert Store(f"sqlite://{tmp_path}/b.sqlite").path == tmp_path / "b.sqlite"
    assert backend("postgresql://u@h/db").__name__ == backend("postgres://u@h/db").__name__ == "PostgresStore"
    with pytest.raises(InputError, match="unknown store 'mysql://u:\\*\\*\\*@h/db'"):
        Store("mysql://u:pw@h/db")
    with pytest.raises(InputError, match="lost a '/'"):
        Store(Path("postgresql://rems@db/vims"))  # a URL once turned into a Path


def test_enrolment_conflicts_and_revocation(store):
    a, b = AvmIdentity.generate("a"), AvmIdentity.generate("b")
    store.enroll(a.public, "vm-1", 40001)
    with pytest.raises(VimsError, match="already enrolled"):
        store.enroll(a.public, "vm-2", 40002)
    with pytest.raises(VimsError, match="already watched"):
        store.enroll(b.public, "vm-1", 40002)
    with pytest.raises(VimsError, match="gate port 40001"):
        store.enroll(b.public, "vm-2", 40001)
    store.revoke("a")
    with pytest.raises(VimsError, match="no enrolled"):
        store.revoke("a")
    store.enroll(b.public, "vm-1", 40001)  # the VM and port are free again
    assert [r["revoked"] for r in store.status()] == [True, False]


def test_policies_are_versioned_and_a_re_enrolled_avm_keeps_its_sequence(store):
    a = AvmIdentity.generate("avm-1")
    assert store.enroll(a.public, "vm-1", 40001, {"threshold": 0.7})["policy_version"] == 1
    assert store.set_policy("vm-1", {"threshold": 0.9}) == 2
    assert store.policy("vm-1")["threshold"] == 0.9 and store.policy("vm-1")["version"] == 2
    with pytest.raises(VimsError, match="no VM 'vm-9' is enrolled"):
        store.set_policy("vm-9", {})
    with pytest.raises(VimsError, match="no VM 'vm-9' is enrolled"):
        store.policy("vm-9")
    store.record_report(avm_id="avm-1", vm_id="vm-1", seq=7, status="accepted", digest="d7")
    # Enrolled again without a policy: the latest policy and the sequence number stay.
    assert store.enroll(a.public, "vm-1", 40001, force=True)["policy_version"] == 2
    assert store.avms()[0]["last_seq"] == 7
    store.record_ack("avm-1", 2)
    store.record_hello("avm-1", {"checks": ["kernel-text"]})
    row = store.avms()[0]
    assert row["acked_version"] == 2 and row["capabilities"] == '{"checks": ["kernel-text"]}'


def test_only_accepted_reports_advance_the_sequence_and_replays_are_recognised(store):
    store.enroll(AvmIdentity.generate("avm-1").public, "vm-1", 40001)
    assert store.record_report(avm_id="avm-1", vm_id="vm-1", seq=5, status="accepted", digest="d5") >= 1
    store.record_report(avm_id="avm-1", vm_id="vm-1", seq=9, status="rejected", reason="stale", digest="d9")
    store.record_report(avm_id="avm-1", vm_id="vm-1", seq=3, status="accepted", digest="d3")  # never lowers it
    assert store.avms()[0]["last_seq"] == 5
    assert store.seen_report("avm-1", 5, "d5")
    assert not store.seen_report("avm-1", 5, "other content")
    assert not store.seen_report("avm-1", 9, "d9")  # refused reports are not "seen"
    assert store.counts() == {"reports": {"accepted": 2, "rejected:stale": 1}, "decisions": {}}


def _accepted(avm_id: str, seq: int, verifier: str = "v1", **over: object) -> dict:
    return {"verifier_id": verifier, "lease_s": 30.0, "avm_id": avm_id, "vm_id": avm_id.replace("avm", "vm"),
            "seq": seq, "nonce": None, "score": 0.9, "verdict": "allow", "detail": "ok", "digest": f"d{seq}",
            "document": "{}", "received_at": 1.0, **over}


def test_accepted_reports_written_together_keep_each_ones_answer(store):
    """``accept_reports``: one transaction, and each report the answer ``accept_report`` would give it
    alone; a report whose statements fail is rolled back by itself, the others are recorded."""
    for i in (1, 2, 3):
        store.enroll(AvmIdentity.generate(f"avm-{i}").public, f"vm-{i}", 40000 + i)
    assert store.take_lease("avm-3", "v2", 30.0)  # another verifier holds avm-3
    results = store.accept_reports([
        _accepted("avm-1", 1), _accepted("avm-1", 2), _accepted("avm-1", 2),  # the second seq 2: too old
        _accepted("avm-2", 7, document=object()),  # a value no driver can store: this one fails alone
        _accepted("avm-3", 1), _accepted("avm-2", 8)])
    answers = [r if isinstance(r, Exception) else r[1:] for r in results]
    assert answers[:3] == [(None, ""), (None, ""), ("out_of_sequence", "seq 2 <= last accepted 2 (by any verifier)")]
    assert isinstance(answers[3], sqlite3.Error | StoreError)
    assert answers[4:] == [("not_leaseholder", "A-VM avm-3's lease is held by verifier v2"), (None, "")]
    stored = {(r["avm_id"], r["seq"]) for r in store._rows("SELECT avm_id, seq FROM reports")}
    assert stored == {("avm-1", 1), ("avm-1", 2), ("avm-2", 8)}
    assert {r["avm_id"]: r["last_seq"] for r in store.avms()} == {"avm-1": 2, "avm-2": 8, "avm-3": 0}
    assert store.lease_holder("avm-2")["verifier_id"] == "v1"


def test_the_history_writer_writes_queued_reports_in_one_transaction(location):
    """Accepted reports queued behind each other go in one transaction; a decision queued among them is
    written after them, in order; every report gets its own answer."""
    import threading

    from vims.remote.history import HistoryWriter
    from vims.remote.metrics import Metrics

    s = Store(location)
    for i in range(1, 11):
        s.enroll(AvmIdentity.generate(f"avm-{i}").public, f"vm-{i}", 41000 + i)
    writer = HistoryWriter(location, Metrics())
    try:
        gate = threading.Event()  # hold the writer on a first write so that the others queue behind it
        writer._store.hold = lambda: gate.wait(10)  # type: ignore[attr-defined]
        held = writer.submit("hold")
        reports = [writer.submit("accept_report", retry=False, **_accepted(f"avm-{i}", 1)) for i in range(1, 11)]
        decision = writer.submit("record_decision", vm_id="vm-1", conn_id="vm-1#1", kind="deny", reason="test")
        gate.set()
        assert held.result(20) is True
        assert [f.result(20)[1] for f in reports] == [None] * 10
        decision.result(20)
    finally:
        writer.close()
    assert writer.groups == 1  # the ten reports queued behind the held write: one transaction
    assert s.counts() == {"reports": {"accepted": 10}, "decisions": {"deny": 1}}
    s.close()


def test_prune_applies_each_vms_retention(store):
    """The retention test of issue 12 item 6, on both backends."""
    now = 1_800_000_000.0
    for vm, age_days in (("vm-a", 10), ("vm-a", 1), ("vm-b", 10)):
        store.record_report(avm_id=None, vm_id=vm, seq=None, status="rejected", reason="stale",
                            document="{}", received_at=now - age_days * 86400)
        store.record_decision(vm_id=vm, conn_id="1", kind="deny", reason="x", at=now - age_days * 86400)
    for _ in range(3):
        store.record_report(avm_id=None, vm_id=None, seq=None, status="rejected", reason="unenrolled")
    out = store.prune({"vm-a": (5.0, 0), "vm-b": (30.0, 1)}, max_unattributed=1, now=now)
    assert out == {"reports": 1, "decisions": 1, "documents": 1, "unattributed": 2, "verifiers": 0}
    left = store._rows("SELECT vm_id, document FROM reports WHERE vm_id IS NOT NULL ORDER BY id")
    assert [(r["vm_id"], r["document"]) for r in left] == [("vm-a", None), ("vm-b", "{}")]


def _script(s: Store) -> dict:
    """The same operations on a store; what they read back, without the clock's values."""
    a, b = AvmIdentity.generate("avm-2"), AvmIdentity.generate("avm-10")
    s.enroll(a.public, "vm-b", 41002, {"threshold": 0.6})
    s.enroll(b.public, "vm-a", 41001)
    s.set_policy("vm-b", {"threshold": 0.8, "deadline_s": 9.0})
    for seq in (1, 2, 3):
        s.record_report(avm_id="avm-2", vm_id="vm-b", seq=seq, status="accepted", nonce=f"n{seq}", score=0.5 + seq / 10,
                        verdict="allow", detail="ok", digest=f"d{seq}", document='{"x": 1}', received_at=1000.0 + seq)
    s.record_report(avm_id="avm-2", vm_id="vm-b", seq=2, status="rejected", reason="replayed", detail="again",
                    received_at=1004.5)
    s.record_report(avm_id=None, vm_id=None, seq=None, status="rejected", reason="unenrolled", detail="who",
                    document="garbage \x00 here", received_at=1005.0)
    s.record_decision(vm_id="vm-b", conn_id="vm-b#1", kind="allow", reason="passes", peer="127.0.0.1:5",
                      latency_s=0.004, report_seq=3, at=1006.0)
    s.record_decision(vm_id="vm-b", conn_id="vm-b#1", kind="cut", reason="deadline", latency_s=12.5, at=1007.0)
    s.revoke("avm-10")
    clock = ("enrolled_at", "last_hello")
    return {"avms": [{k: v for k, v in r.items() if k not in clock} for r in s.avms()],
            "status": [{k: v for k, v in r.items() if k not in clock} for r in s.status()],
            "counts": s.counts(), "history": s.history("vm-b", limit=3), "policy": s.policy("vm-b"),
            "prune": s.prune({"vm-b": (1.0, 1)}, max_unattributed=5, now=1007.0 + 86400)}


def test_both_backends_read_back_the_same(tmp_path, postgres_url):  # noqa: F811
    sqlite, postgres = Store(tmp_path / "rems.sqlite"), Store(postgres_url)
    try:
        got_sqlite, got_postgres = _script(sqlite), _script(postgres)
    finally:
        sqlite.close()
        postgres.close()
    for avm in (*got_sqlite["avms"], *got_postgres["avms"]):  # each run made its own keys and revoked at its time
        avm.pop("curve_public"), avm.pop("sign_public"), avm.pop("revoked_at")
    assert [a["avm_id"] for a in got_sqlite["avms"]] == ["avm-10", "avm-2"]  # byte order, as SQLite sorts
    assert got_postgres == got_sqlite


def test_a_nul_in_a_refused_message_is_kept_not_a_failed_write(store):
    store.record_report(avm_id=None, vm_id=None, seq=None, status="rejected", reason="malformed",
                        document="\x00\x01 not json")
    assert store.counts()["reports"] == {"rejected:malformed": 1}


def test_another_connections_enrolment_changes_the_data_version(location):
    server, cli = Store(location), Store(location)
    try:
        before = server.data_version()
        cli.enroll(AvmIdentity.generate("avm-1").public, "vm-1", 40001)
        after_enrol = server.data_version()
        cli.set_policy("vm-1", {"threshold": 0.9})
        after_policy = server.data_version()
        cli.revoke("avm-1")
        assert before != after_enrol != after_policy != server.data_version()
    finally:
        server.close()
        cli.close()


# -- migrations -----------------------------------------------------------------------------------------


def test_a_sqlite_file_of_the_schema_before_migrations_is_migrated_and_kept(tmp_path):
    path = tmp_path / "rems.sqlite"
    old = sqlite3.connect(path)  # what `Store` made before migrations: the tables, no schema_version
    old.executescript(";\n".join(_SQLITE_V1) + ";")
    old.execute("INSERT INTO avms (avm_id, vm_id, curve_public, sign_public, gate_port, enrolled_at, last_seq) "
                "VALUES ('avm-1', 'vm-1', 'c', 's', 40001, 1.0, 41)")
    old.execute("INSERT INTO policies VALUES ('vm-1', 3, '{}', 1.0)")
    old.commit()
    old.close()
    store = Store(path)
    try:
        assert schema_version(store) == MIGRATIONS[-1].version >= 2
        assert store._has_table("leases") and store.leases() == []
        assert store.avms()[0]["last_seq"] == 41 and store.policy("vm-1")["version"] == 3
        assert store.set_policy("vm-1", {}) == 4
    finally:
        store.close()


def test_a_newer_schema_is_refused(location):
    Store(location).close()
    if isinstance(location, str):
        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute("INSERT INTO schema_version VALUES (99, 'from the future', 0)")
    else:
        with sqlite3.connect(location) as conn:
            conn.execute("INSERT INTO schema_version VALUES (99, 'from the future', 0)")
    with pytest.raises(VimsError, match=f"schema is v99, newer than this VIMS knows \\(v{MIGRATIONS[-1].version}\\)"):
        Store(location)


def test_migrations_apply_in_order_each_in_one_transaction(store):
    n = MIGRATIONS[-1].version
    ok = Migration(n + 1, "a table", ("CREATE TABLE extra (x INTEGER)",), ("CREATE TABLE extra (x INTEGER)",))
    bad = Migration(n + 2, "half of it fails", ("CREATE TABLE extra2 (x INTEGER)", "INSERT INTO nowhere VALUES (1)"),
                    ("CREATE TABLE extra2 (x INTEGER)", "INSERT INTO nowhere VALUES (1)"))
    assert migrate(store, migrations=(*MIGRATIONS, ok)) == n + 1
    with pytest.raises((StoreError, sqlite3.Error)):
        migrate(store, migrations=(*MIGRATIONS, ok, bad))
    assert schema_version(store) == n + 1
    assert store._has_table("extra") and not store._has_table("extra2")  # the failed step left nothing
    assert [r["name"] for r in store._rows("SELECT name FROM schema_version ORDER BY version")] == [
        *(m.name for m in MIGRATIONS), "a table"]


def test_an_empty_postgresql_database_is_not_taken_for_a_history(postgres_url):  # noqa: F811
    with pytest.raises(VimsError, match="holds no REM-S history \\(run `vims remote init` on it first\\)"):
        Store(postgres_url, create=False)
    Store(postgres_url).close()
    Store(postgres_url, create=False).close()


# -- PostgreSQL's faults --------------------------------------------------------------------------------


def _kill_store_connections(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return len(conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE application_name = 'vims-rems' AND pid <> pg_backend_pid()").fetchall())


def test_a_killed_connection_fails_the_next_write_clearly_and_the_one_after_reconnects(postgres_url):  # noqa: F811
    store = Store(postgres_url)
    try:
        store.enroll(AvmIdentity.generate("avm-1").public, "vm-1", 40001)
        store.record_report(avm_id="avm-1", vm_id="vm-1", seq=1, status="accepted", digest="d1")
        assert _kill_store_connections(postgres_url) == 1
        with pytest.raises(StoreError, match="connection lost \\(the next operation reconnects\\): terminating "
                                             "connection due to administrator command") as failed:
            store.record_report(avm_id="avm-1", vm_id="vm-1", seq=2, status="accepted", digest="d2")
        assert isinstance(failed.value, OSError)  # what the history writer counts as an unwritable history
        assert store.record_report(avm_id="avm-1", vm_id="vm-1", seq=3, status="accepted", digest="d3")
        # The failed write is not there (nothing half-written); the others are, and the sequence is right.
        assert [r["seq"] for r in store.history("vm-1")["reports"]] == [3, 1]
        assert store.avms()[0]["last_seq"] == 3
        assert _kill_store_connections(postgres_url) == 1  # a read fails the same way, then reconnects
        with pytest.raises(StoreError, match="connection lost"):
            store.seen_report("avm-1", 3, "d3")
        assert store.seen_report("avm-1", 3, "d3")
    finally:
        store.close()


def test_an_unreachable_server_is_a_one_line_error_without_the_password(tmp_path):
    url = f"postgresql://rems:hunter2@/vims?host={tmp_path}/nothing-here"
    env = {**os.environ, "VIMS_REMOTE_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "vims.cli", "remote", "status", "--store", url], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "cannot connect" in proc.stderr and "rems:***@" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_the_remote_commands_work_on_a_store_given_by_url(tmp_path, location):
    """``--store`` on init, enroll, policy, revoke, status and history; the URL's password is never shown."""
    from typer.testing import CliRunner

    from vims.cli import app

    if isinstance(location, str):  # the test server trusts its socket: a password is sent to no one
        location = location.replace("postgresql://vims@", "postgresql://vims:topsecret@")
    else:
        location = f"sqlite://{location}"
    env = {"VIMS_REMOTE_HOME": str(tmp_path / "rems"), "VIMS_AVM_HOME": str(tmp_path / "avm"),
           "VIMS_REMOTE_STORE": ""}

    def run(*args: str) -> str:
        result = CliRunner().invoke(app, [*args, "--store", location], env=env)
        assert result.exit_code == 0, result.output
        assert "topsecret" not in result.output
        return result.stdout

    missing = CliRunner().invoke(app, ["remote", "status", "--store", location], env=env).exception  # no init yet
    assert isinstance(missing, VimsError) and "vims remote init" in str(missing) and "topsecret" not in str(missing)
    assert "***" in json.loads(run("remote", "init", "--json"))["database"] or location.startswith("sqlite")
    avm = json.loads(CliRunner().invoke(app, ["avm", "init", "--id", "avm-a", "--json"], env=env).stdout)
    run("remote", "enroll", avm["public_key_file"], "--vm", "vm-a", "--gate-port", "40123")
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"threshold": 0.75}))
    assert json.loads(run("remote", "policy", "vm-a", "--set", str(policy), "--json"))["version"] == 2
    run("remote", "revoke", "avm-a")
    status = json.loads(run("remote", "status", "--json"))
    assert [(a["avm_id"], a["revoked"], a["policy_version"]) for a in status["avms"]] == [("avm-a", True, 2)]
    assert json.loads(run("remote", "history", "vm-a", "--json"))["reports"] == []
    assert not (tmp_path / "rems" / "rems.sqlite").exists()  # the home holds the keys only
