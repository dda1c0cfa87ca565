"""REM-S serving from PostgreSQL: forged and replayed reports are still refused, a killed database
connection fails closed (the report it could not record is refused, naming why), then REM-S reconnects,
and the store's notifications (LISTEN/NOTIFY, not polling) carry a revocation and a lease taken by another
verifier to the open connections they cut.

Real CURVE sockets, a real PostgreSQL server (tests/postgres_fixture.py). Nothing here asserts a duration.
"""

from __future__ import annotations

import json
import socket
import time

import psycopg
import pytest

from tests.postgres_fixture import postgres_server, postgres_url  # noqa: F401  (fixtures)
from vims.net import free_ports
from vims.remote.keys import AvmIdentity, ServerKeys
from vims.remote.protocol import example_report
from vims.remote.server import ServerThread
from vims.remote.store import Store
from vims.remote.testing import RawAvm, read_line, wait_until

FAST = {"interval_s": 0.3, "deadline_s": 1.5, "attest_timeout_s": 5.0}

def content() -> dict:
    report = example_report(time=time.time())
    return {k: report[k] for k in ("behaviour", "checks", "events", "collector", "measured_at", "model")}


class PgDeployment:
    """One VM with its A-VM enrolled in a PostgreSQL store, and REM-S serving from it."""

    def __init__(self, url: str, **server: object) -> None:
        self.url = url
        self.keys = ServerKeys.generate()
        self.avm = AvmIdentity.generate("avm-1")
        self.gate_port, control = free_ports(2)
        store = Store(url)
        store.enroll(self.avm.public, "vm-1", self.gate_port, FAST)
        store.close()
        self.thread = ServerThread(url, self.keys, demo_service=True, control=f"tcp://127.0.0.1:{control}",
                                   **server).start()
        self.raw = RawAvm(self.avm, self.thread.server.endpoint, self.keys.public)
        wait_until(lambda: self.store_read(lambda s: s.avms()[0]["acked_version"]) == 1, what="the ack recorded")

    def store_read(self, fn):
        store = Store(self.url)
        try:
            return fn(store)
        finally:
            store.close()

    def report(self, nonce: str | None = None) -> dict:
        self.raw.send(self.raw.session.report(content(), nonce=nonce))
        return self.raw.expect("ack")

    def metric(self, name: str) -> float:
        return float(self.thread.call(lambda: self.thread.server.metrics.get(name)))

    def let_in(self) -> socket.socket:
        """A client connection through the gate, allowed on a fresh report (relay checked)."""
        client = socket.create_connection(("127.0.0.1", self.gate_port), timeout=20)
        client.settimeout(20)
        assert self.report(nonce=self.raw.expect("nonce")["nonce"])["accepted"] is True
        client.sendall(b"hello\n")
        assert read_line(client) == b"data: hello\n"
        return client

    def close(self) -> None:
        self.raw.close()
        self.thread.stop()


def last_word(client: socket.socket) -> bytes:
    """The gate's ``VIMS ...`` line, past what the demo service sent before it."""
    while (line := read_line(client)) and not line.startswith(b"VIMS"):
        pass
    return line


@pytest.fixture
def dep(postgres_url):  # noqa: F811
    d = PgDeployment(postgres_url)
    yield d
    d.close()


def test_forged_and_replayed_reports_are_refused(dep):
    first = dep.raw.session.report(content())
    dep.raw.send(first)
    assert dep.raw.expect("ack")["accepted"] is True
    dep.raw.send(first)
    assert dep.raw.expect("ack")["reason"] == "replayed"
    forged = json.loads(dep.raw.session.report(content()))
    forged["body"]["behaviour"]["score"] = 1.0  # changed after signing
    dep.raw.send(json.dumps(forged).encode())
    assert dep.raw.expect("ack")["reason"] == "bad_signature"
    assert dep.report()["accepted"] is True
    counts = wait_until(lambda: (c := dep.store_read(lambda s: s.counts()["reports"])).get("rejected:bad_signature")
                        and c, what="the refusals recorded")
    assert counts == {"accepted": 2, "rejected:replayed": 1, "rejected:bad_signature": 1}


def test_a_killed_database_connection_fails_closed_then_reconnects(dep):
    assert dep.report()["accepted"] is True
    with psycopg.connect(dep.url, autocommit=True) as conn:
        killed = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE application_name = 'vims-rems' AND pid <> pg_backend_pid()").fetchall()
    # REM-S's reading connection and its history writer's (and any an earlier test's server left to GC)
    assert len(killed) >= 2
    ack = dep.report()
    assert (ack["accepted"], ack["reason"]) == (False, "unrecorded")
    assert "history cannot be written" in ack["detail"] and "connection lost" in ack["detail"]
    assert dep.report()["accepted"] is True  # the next write reconnected
    wait_until(lambda: dep.thread.call(lambda: dep.thread.server.metrics.get("vims_history_writable")) == 1,
               what="the history writable again")
    wait_until(lambda: dep.metric("vims_store_listening") == 1, what="the notifications heard again")
    assert dep.thread.call(lambda: dep.thread.server.metrics.get("vims_history_write_failures_total")) >= 1
    with socket.create_connection(("127.0.0.1", dep.gate_port), timeout=20) as client:
        client.settimeout(20)
        assert dep.report(nonce=dep.raw.expect("nonce")["nonce"])["accepted"] is True  # the gate's attestation
        client.sendall(b"after the fault\n")
        assert read_line(client) == b"data: after the fault\n"
    # The refused report (seq 2) was not recorded; the accepted ones are, and the allow decision.
    history = wait_until(lambda: (h := dep.store_read(lambda s: s.history("vm-1")))["decisions"] and h,
                         what="the allow recorded")
    assert [(r["seq"], r["status"]) for r in history["reports"]] == [(4, "accepted"), (3, "accepted"), (1, "accepted")]
    assert history["decisions"][0]["kind"] == "allow"


def test_a_revocation_reaches_the_verifier_by_notification(dep):
    """Revoked by another process (the CLI's store connection): the open connection is cut by the
    notification; while it listens, the verifier does not poll the store for changes at all."""
    wait_until(lambda: dep.metric("vims_store_listening") == 1, what="the verifier listening")
    client = dep.let_in()
    with client:
        before = dep.metric("vims_store_notifications_total")
        dep.store_read(lambda s: s.revoke("avm-1"))
        assert last_word(client) == b"VIMS CUT A-VM avm-1 revoked\n"
    assert dep.metric("vims_store_notifications_total") > before


def test_a_lease_taken_by_another_verifier_cuts_here_at_once(postgres_url):  # noqa: F811
    """Another verifier took this one's A-VM (as a takeover writes the lease row): the notification makes
    this verifier cut the VM's open connection, naming the new holder, and stop listening at its gate,
    long before its own heartbeat (a third of a 60 s lease) would have found out."""
    dep = PgDeployment(postgres_url, lease_s=60.0)
    try:
        wait_until(lambda: dep.metric("vims_store_listening") == 1, what="the verifier listening")
        client = dep.let_in()
        with client:
            assert dep.store_read(lambda s: s.lease_holder("avm-1"))["verifier_id"] == dep.thread.server.verifier_id
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                conn.execute("UPDATE leases SET verifier_id = 'v-other', generation = generation + 1, "
                             "renewed_at = EXTRACT(EPOCH FROM clock_timestamp()), "
                             "expires_at = EXTRACT(EPOCH FROM clock_timestamp()) + 60 WHERE avm_id = 'avm-1'")
            assert last_word(client) == b"VIMS CUT A-VM avm-1's lease was taken by verifier v-other\n"

        def gate_closed() -> bool:
            try:
                socket.create_connection(("127.0.0.1", dep.gate_port), timeout=5).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_until(gate_closed, what="the gate closed here (the holder listens)")
        assert dep.metric("vims_leases_held") == 0
    finally:
        dep.close()


def test_serve_with_a_postgresql_store(tmp_path, postgres_url):  # noqa: F811
    """``vims remote serve --store postgresql://...``: A-VM reports are accepted and recorded there, a
    client is let through, and the URL's password appears in neither the output nor the logs."""
    import os
    import signal
    import subprocess
    import sys

    from vims.net import free_port
    from vims.remote.keys import load_server_public
    from vims.remote.simavm import SimulatedAvm

    url = postgres_url.replace("postgresql://vims@", "postgresql://vims:topsecret@")  # trust: never sent
    env = {**os.environ, "VIMS_REMOTE_HOME": str(tmp_path / "rems"), "VIMS_REMOTE_STORE": url}
    cli = [sys.executable, "-m", "vims.cli", "remote"]
    subprocess.run([*cli, "init"], env=env, check=True, capture_output=True, timeout=60)
    ident = AvmIdentity.generate("avm-a")
    public_file = ident.write(tmp_path / "avm")
    port = free_port()
    subprocess.run([*cli, "enroll", str(public_file), "--vm", "vm-a", "--gate-port",
                    str(port)], env=env, check=True, capture_output=True, timeout=60)
    proc = subprocess.Popen([*cli, "serve", "--control", f"tcp://127.0.0.1:{free_port()}", "--demo-service",
                             "--metrics-port", "0", "--seconds", "120", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["gates"] == {"vm-a": port} and info["store"].startswith("postgresql://vims:***@")
        with SimulatedAvm(ident, info["control"], load_server_public(tmp_path / "rems" / "rems.public.json")) as avm:
            avm.wait_policy(20)
            wait_until(lambda: avm.session.accepted >= 1, what="an accepted report")
            with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
                client.sendall(b"through postgresql\n")
                assert read_line(client) == b"data: through postgresql\n"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert "topsecret" not in out + err
    store = Store(url)
    try:
        assert store.counts()["reports"]["accepted"] >= 1 and store.counts()["decisions"]["allow"] == 1
    finally:
        store.close()
