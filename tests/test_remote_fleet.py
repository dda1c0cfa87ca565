"""REM-S for fleets: two real ``vims remote serve`` processes over one real PostgreSQL server.

Real CURVE keys and sockets, the real protocol (simulated A-VMs), real gates with the demo service, the
shared store of tests/postgres_fixture.py. One verifier is killed with SIGKILL; its A-VMs fail over to
the other, which takes their leases once expired. Nothing here asserts a duration: the assertions are
on the order of events (in the store, by the database's clock and its ids) and on what was allowed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.postgres_fixture import postgres_server, postgres_url  # noqa: F401  (fixtures)
from vims.net import free_port
from vims.remote.keys import AvmIdentity, load_server_public
from vims.remote.simavm import SimulatedAvm
from vims.remote.store import Store
from vims.remote.testing import read_line, wait_until

LEASE_S = 2.0
POLICY = {"interval_s": 0.4, "deadline_s": 3.0, "attest_timeout_s": 5.0}
CLI = [sys.executable, "-m", "vims.cli", "remote"]


def _serve(env: dict[str, str], verifier: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen([*CLI, "serve", "--control", f"tcp://127.0.0.1:{free_port()}", "--demo-service",
                             "--metrics-port", "0", "--seconds", "300", "--json", "--quiet",
                             "--verifier-id", verifier, "--lease-s", str(LEASE_S)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"vims remote serve did not start: {proc.communicate(timeout=30)[1][-2000:]}")
    return proc, json.loads(line)


def _attempt(port: int) -> str:
    """One client connection through a gate: 'allow' (the demo service answered), 'deny', or 'closed'
    (nothing listens there, or the connection ended without a word)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.settimeout(20)
            client.sendall(b"hello fleet\n")
            line = read_line(client)
    except (ConnectionRefusedError, ConnectionResetError):
        return "closed"
    if line == b"data: hello fleet\n":
        return "allow"
    return "deny" if line.startswith(b"VIMS DENY") else "closed"


def _allows_backed(store: Store, vm_ids: list[str], after_report: int, after_decision: int,
                   verifier: str) -> list[dict[str, Any]]:
    """Every allow of ``vm_ids`` recorded after ``after_decision``, each checked to rest on a report
    that ``verifier`` accepted after report id ``after_report``; returns them."""
    allows = []
    for vm_id in vm_ids:
        for dec in store.history(vm_id, limit=10000)["decisions"]:
            if dec["id"] > after_decision and dec["kind"] == "allow":
                rows = store._rows("SELECT id, status, verdict, verifier_id FROM reports WHERE vm_id = ? "
                                   "AND seq = ? AND status = 'accepted'", (vm_id, dec["report_seq"]))
                assert len(rows) == 1, (vm_id, dec, rows)
                assert rows[0]["verifier_id"] == verifier and rows[0]["id"] > after_report, (vm_id, dec, rows)
                assert rows[0]["verdict"] == "allow"
                allows.append(dec)
    return allows


def test_a_killed_verifiers_avms_move_to_the_other_with_no_allow_in_between(tmp_path: Path,
                                                                            postgres_url: str) -> None:  # noqa: F811
    env = {**os.environ, "VIMS_REMOTE_HOME": str(tmp_path / "rems"), "VIMS_REMOTE_STORE": postgres_url}
    subprocess.run([*CLI, "init"], env=env, check=True, capture_output=True, timeout=60)
    store = Store(postgres_url)
    avms: list[tuple[AvmIdentity, str, int]] = []
    for i in range(6):
        ident = AvmIdentity.generate(f"avm-{i}")
        vm_id, port = f"vm-{i}", free_port()
        store.enroll(ident.public, vm_id, port, POLICY)
        avms.append((ident, vm_id, port))
    v1, info1 = _serve(env, "v1")
    v2, info2 = _serve(env, "v2")
    server_public = load_server_public(tmp_path / "rems" / "rems.public.json")
    e1, e2 = info1["control"], info2["control"]
    sims = []
    try:
        # Even A-VMs are given [v1, v2], odd ones [v2, v1]; avm-5 reports a failing score throughout.
        for i, (ident, _vm, _port) in enumerate(avms):
            order = [e1, e2] if i % 2 == 0 else [e2, e1]
            sims.append(SimulatedAvm(ident, order, server_public, score=0.1 if i == 5 else 0.95,
                                     failover_s=2.0).start())
        home = {f"avm-{i}": "v1" if i % 2 == 0 else "v2" for i in range(6)}
        wait_until(lambda: {r["avm_id"]: r["verifier_id"] for r in store.leases() if not r["expired"]} == home,
                   timeout=60, what="every A-VM leased by the verifier it was given first")
        # Each verifier accepts only its own A-VMs' reports.
        by = {(r["avm_id"], r["verifier_id"]) for r in store._rows(
            "SELECT DISTINCT avm_id, verifier_id FROM reports WHERE status = 'accepted'")}
        assert by <= set(home.items())
        # A gate lets through a passing VM's client, at whichever verifier holds its A-VM.
        wait_until(lambda: _attempt(avms[0][2]) == "allow", timeout=30, what="vm-0 (at v1) allowed")
        wait_until(lambda: _attempt(avms[1][2]) == "allow", timeout=30, what="vm-1 (at v2) allowed")
        assert _attempt(avms[5][2]) in ("deny", "closed")  # the failing VM never gets through
        # An A-VM that also talks to the verifier not holding its lease (it flapped there) is refused
        # there, report after report, while the holder renews: no verifier takes a lease that is held.
        stray = SimulatedAvm(avms[0][0], [e2], server_public, failover_s=60.0).start()
        try:
            wait_until(lambda: stray.session.rejected["not_leaseholder"] >= 3, timeout=30,
                       what="the stray A-VM's reports refused at v2")
            assert stray.session.accepted == 0
        finally:
            stray.stop()
        held = socket.create_connection(("127.0.0.1", avms[2][2]), timeout=20)  # a client of v1's, open
        held.settimeout(20)
        held.sendall(b"before\n")
        assert read_line(held) == b"data: before\n"

        v1.send_signal(signal.SIGKILL)
        v1.wait(30)
        mark_report = int(store._value("SELECT COALESCE(MAX(id), 0) AS m FROM reports"))
        mark_decision = int(store._value("SELECT COALESCE(MAX(id), 0) AS m FROM decisions"))
        last = {r["avm_id"]: r for r in store.leases() if r["verifier_id"] == "v1"}
        moved = sorted(a for a, v in home.items() if v == "v1")
        assert sorted(last) == moved
        # The killed verifier's open connection died with it.
        try:
            rest = held.recv(100)
        except (ConnectionResetError, TimeoutError):
            rest = b""
        assert rest == b"" or rest.startswith(b"\nVIMS CUT")
        held.close()

        # While its A-VMs re-home, clients keep trying the moved VMs' gates.
        moved_vms = [f"vm-{a.split('-')[1]}" for a in moved]
        ports = {vm: port for _i, vm, port in avms}
        outcomes: list[tuple[str, str]] = []

        def rehomed() -> bool:
            for vm in moved_vms:
                outcomes.append((vm, _attempt(ports[vm])))
            rows = {r["avm_id"]: r for r in store.leases()}
            if not all(rows[a]["verifier_id"] == "v2" and not rows[a]["expired"] for a in moved):
                return False
            return all(store._value("SELECT COUNT(*) AS n FROM reports WHERE avm_id = ? AND status = 'accepted' "
                                    "AND verifier_id = 'v2' AND id > ?", (a, mark_report)) for a in moved)

        wait_until(rehomed, timeout=90, what="v1's A-VMs accepted by v2")
        now = {r["avm_id"]: r for r in store.leases()}
        for avm_id in moved:
            # v2 took each lease only once v1's had expired (by the database's clock), as a new holder.
            assert now[avm_id]["acquired_at"] >= last[avm_id]["expires_at"]
            assert now[avm_id]["generation"] > last[avm_id]["generation"]
            assert next(s for s in sims if s.identity.avm_id == avm_id).endpoint == e2
        # Every allow of a moved VM after the kill rests on a fresh report v2 accepted after the kill.
        allowed_between = _allows_backed(store, moved_vms, mark_report, mark_decision, "v2")
        assert len(allowed_between) == sum(o == "allow" for _vm, o in outcomes)
        # After re-homing, the moved VMs' clients get through v2 again, and that too rests on v2's report.
        wait_until(lambda: _attempt(ports["vm-0"]) == "allow", timeout=30, what="vm-0 allowed at v2")
        assert _allows_backed(store, ["vm-0"], mark_report, mark_decision, "v2")
        # The failing VM was never allowed by either verifier.
        assert not [d for d in store.history("vm-5", limit=10000)["decisions"] if d["kind"] == "allow"]
        # No report was accepted by a verifier not holding the lease: each accepted report's verifier is
        # its A-VM's home before the kill, and v2 after it for the moved ones.
        for row in store._rows("SELECT id, avm_id, verifier_id FROM reports WHERE status = 'accepted'"):
            expected = home[row["avm_id"]] if row["id"] <= mark_report or row["avm_id"] not in moved else "v2"
            assert row["verifier_id"] == expected, row
        # The lease table says who holds what, for `vims remote status`.
        assert {r["verifier_id"] for r in store.leases() if not r["expired"]} == {"v2"}
        assert [v["verifier_id"] for v in store.verifiers(live_only=True)] == ["v2"]
    finally:
        for sim in sims:
            sim.stop()
        for proc in (v1, v2):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            with_output = proc.communicate(timeout=30)
            assert "Traceback" not in with_output[1], with_output[1][-3000:]
        store.close()
