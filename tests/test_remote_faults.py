"""REM-S fails closed under faults: a history that cannot be written, missing evidence, wrong policy.

Real CURVE sockets and a real SQLite file; a second SQLite connection holding the write lock is the fault.
No durations are asserted: the order of events and what was recorded are.
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from vims.remote.policy import evaluate, normalise_policy
from vims.remote.protocol import example_report
from vims.remote.simavm import SimulatedAvm
from vims.remote.testing import Deployment, RawAvm, read_all, read_line, wait_until

FAST = {"interval_s": 0.3, "deadline_s": 1.5, "attest_timeout_s": 5.0}


@pytest.fixture
def dep(tmp_path):
    d = Deployment(tmp_path, vms=1, policy=FAST)
    d.start()
    yield d
    d.stop()


def sim(dep: Deployment, **kwargs) -> SimulatedAvm:
    client = SimulatedAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public, **kwargs).start()
    client.wait_policy(20)
    wait_until(lambda: dep.thread.call(lambda: dep.thread.server.avms["avm-1"].acked_version),
               what="policy acknowledged")
    return client


def content(**kw) -> dict:
    report = example_report(time=time.time(), **kw)
    return {k: report[k] for k in ("behaviour", "checks", "events", "collector", "measured_at", "model")}


def test_locked_history_cuts_the_open_connection_and_refuses_new_ones(dep):
    """Item 1: the cut happens although its record cannot be written; new connections are refused."""
    with sim(dep):
        client = dep.connect()
        client.sendall(b"ping\n")
        assert read_line(client) == b"data: ping\n"
        locker = sqlite3.connect(dep.db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # holds the write lock: every write of REM-S fails or waits
        try:
            assert read_all(client).startswith(b"\nVIMS CUT no fresh report within 1.5 s")
            assert dep.metric("vims_open_connections") == 0
            wait_until(lambda: dep.metric("vims_history_writable") == 0, what="the history to count as unwritable")
            assert dep.metric("vims_history_write_failures_total") >= 1
            assert dep.line("vims_history_writable") + " 0" in dep.scrape()
            assert read_all(dep.connect()).startswith(b"VIMS DENY history cannot be written")
            assert dep.metric("vims_reports_rejected_total", reason="unrecorded") >= 1
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        # Once the lock is gone the cut is recorded after all, and connections are let through again.
        wait_until(lambda: [d for d in dep.store().history("vm-1")["decisions"] if d["kind"] == "cut"],
                   what="the cut to be recorded")
        wait_until(lambda: dep.metric("vims_history_writable") == 1, what="the history to be writable again")
        again = dep.connect()
        again.sendall(b"x\n")
        assert read_line(again) == b"data: x\n"
        again.close()
    kinds = [d["kind"] for d in dep.store().history("vm-1")["decisions"]][::-1]
    assert kinds[0] == "allow" and "cut" in kinds and kinds[-1] == "allow"


@pytest.mark.parametrize(("fault", "error"), [
    ("full", "database or disk is full"),
    ("read-only", "attempt to write a readonly database"),
])
def test_full_or_read_only_history_cuts_and_refuses_then_recovers(dep, fault, error):
    """Item 1 and the fault suite: SQLite's own "full" (no page may be added) and "read-only" errors on
    REM-S's history connection: the open connection is cut, new ones are refused naming the error, and
    all is well again once the fault is gone."""
    db = dep.thread.server.history._store.db  # REM-S's own connection; SQLite serialises its users
    with sim(dep):
        client = dep.connect()
        client.sendall(b"ping\n")
        assert read_line(client) == b"data: ping\n"
        if fault == "full":
            db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
        else:
            db.execute("PRAGMA query_only = ON")
        try:
            assert read_all(client).startswith(b"\nVIMS CUT no fresh report within 1.5 s")
            wait_until(lambda: dep.metric("vims_history_writable") == 0, what="the history to count as unwritable")
            # Refused by the gate's own look at the history, or because the report it asked for could not
            # be recorded: either way a denial that names the error.
            denied = read_all(dep.connect())
            assert denied.startswith(b"VIMS DENY") and b"history cannot be written" in denied, denied
            assert error.encode() in denied, denied
        finally:
            db.execute("PRAGMA query_only = OFF")
            db.execute("PRAGMA max_page_count = 1073741823")
        wait_until(lambda: dep.metric("vims_history_writable") == 1, what="the history to be writable again")
        again = dep.connect()
        again.sendall(b"x\n")
        assert read_line(again) == b"data: x\n"
        again.close()


def test_event_loop_keeps_serving_while_the_history_is_locked(dep):
    """Item 1: no database call on the event loop: metrics answer while a write waits for the lock."""
    with sim(dep):
        locker = sqlite3.connect(dep.db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            denied = read_all(dep.connect())
            text = dep.scrape()  # served by the same loop while writes wait
            assert denied.startswith(b"VIMS DENY")
            assert "vims_history_writable" in text
        finally:
            locker.execute("ROLLBACK")
            locker.close()


@pytest.mark.parametrize(("knob", "value", "reason"), [
    ("score", None, b"VIMS DENY no behaviour evidence"),
    ("collector_alive", False, b"VIMS DENY collector not alive"),
    ("missing_events", 10, b"VIMS DENY 10 of 100 events dropped or missing"),
    # Item 11: a connect nonce answered by re-signing an old measurement proves liveness, not freshness.
    ("measurement_age_s", 60.0, b"VIMS DENY measurement made 60."),
])
def test_missing_evidence_is_refused_with_its_reason(dep, knob, value, reason):
    """Item 3: a report without the evidence the policy demands lets no client through."""
    with sim(dep) as avm:
        ok = dep.connect()
        ok.sendall(b"a\n")
        assert read_line(ok) == b"data: a\n"
        setattr(avm, knob, value)
        assert read_all(ok).startswith(b"\nVIMS CUT " + reason[len(b"VIMS DENY "):])
        assert read_all(dep.connect()).startswith(reason)


def test_stale_or_absent_check_results_fail_the_policy():
    """Item 3: every_s is enforced; a result from 1970 or from the future, or no checks, fails."""
    policy = normalise_policy({})
    now = 1764240000.0
    old = example_report(time=now)
    old["checks"][0]["ts_ns"] = 1
    assert evaluate(old, policy, now)[1].startswith("check kernel-text result is")
    future = example_report(time=now)
    future["checks"][0]["ts_ns"] = int((now + 60) * 1e9)
    assert "in the future" in evaluate(future, policy, now)[1]
    undated = example_report(time=now)
    del undated["checks"][0]["ts_ns"]
    assert evaluate(undated, policy, now) == (False, "check kernel-text result carries no time (ts_ns)")
    assert evaluate(example_report(time=now, checks=[]), policy, now) == (False, "report carries no check results")
    # A policy that names no check is the only one a report without checks can pass.
    assert evaluate(example_report(time=now, checks=[]), normalise_policy({"checks": []}), now)[0] is True
    for field, why in (("measured_at", "measured_at"), ("model", "model.sha256")):
        r = example_report(time=now)
        del r[field]
        assert why in evaluate(r, policy, now)[1]
    stale = example_report(time=now, measured_at=now - 60)
    assert evaluate(stale, policy, now)[1].startswith("measurement made 60.0 s ago")
    no_alive = example_report(time=now, collector={"state": "running"})
    assert evaluate(no_alive, policy, now) == (False, "report does not say the collector is alive")
    pinned = normalise_policy({"models": ["a" * 64]})
    assert "is not one the policy allows" in evaluate(example_report(time=now), pinned, now)[1]
    assert evaluate(example_report(time=now, model={"sha256": "a" * 64, "path": "m"}), pinned, now)[0]


def test_report_under_an_old_policy_version_is_refused(dep):
    """Item 10: policy_version is compared with the VM's current version; policy_ack is validated."""
    raw = RawAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public)
    frame = raw.session.report(content())
    raw.session.policy["version"] += 7
    wrong = raw.session.report(content())
    raw.send(wrong)
    ack = raw.expect("ack")
    assert (ack["accepted"], ack["reason"]) == (False, "wrong_policy")
    raw.send(frame)
    assert raw.expect("ack")["accepted"] is True
    raw.send(raw.session._frame("policy_ack", {"version": 99}))
    wait_until(lambda: dep.metric("vims_reports_rejected_total", reason="wrong_policy") == 2,
               what="the bad policy_ack to be refused")
    assert dep.thread.call(lambda: dep.thread.server.avms["avm-1"].acked_version) != 99
    assert json.loads(frame)["body"]["policy_version"] == 1
    raw.close()


def test_cuts_do_not_wait_for_clients_that_never_read(dep):
    """Item 4: six clients that never read do not delay the cut of a seventh (cuts run concurrently)."""
    import re
    import socket

    with sim(dep) as avm:
        stuck = []
        for _ in range(6):
            c = dep.connect()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.sendall(b"ping\n")
            assert read_line(c) == b"data: ping\n"
            c.setblocking(False)
            try:  # the service echoes all of it; nobody reads: REM-S's side backs up
                for _ in range(400):
                    c.send(b"y" * 4000 + b"\n")
            except BlockingIOError:
                pass
            stuck.append(c)
        last = dep.connect()
        last.sendall(b"ping\n")
        assert read_line(last) == b"data: ping\n"
        avm.silent = True
        line = read_all(last)
        assert line.startswith(b"\nVIMS CUT no fresh report within 1.5 s")
        wait_until(lambda: sum(d["kind"] == "cut" for d in dep.store().history("vm-1")["decisions"]) == 7,
                   what="seven cuts recorded")
        # Every cut was made on the watch loop's first pass over the deadline, none a second later
        # (serial 1 s drains would put the last one 6 s past it): the recorded ages say so.
        ages = [float(m.group(1)) for d in dep.store().history("vm-1")["decisions"] if d["kind"] == "cut"
                for m in [re.search(r"last accepted ([0-9.]+) s ago", d["reason"])] if m]
        assert len(ages) == 7 and max(ages) < FAST["deadline_s"] + 1.0
        for c in stuck:
            c.close()


def test_half_close_is_relayed_and_the_answer_still_arrives(dep):
    """Item 12: a client that shuts down its sending side still reads the service's answer."""
    import socket

    with sim(dep):
        for _ in range(5):
            client = dep.connect()
            client.sendall(b"last words\n")
            client.shutdown(socket.SHUT_WR)
            assert read_all(client) == b"data: last words\n"
            client.close()
    wait_until(lambda: dep.metric("vims_open_connections") == 0, what="the relays to end")


def test_policy_changed_while_rems_was_down_is_pushed_on_reconnect(tmp_path):
    """Item 9: the A-VM reconnects after a REM-S restart and gets the policy set meanwhile."""
    from vims.net import free_port

    d = Deployment(tmp_path, vms=1, policy=FAST)
    control = f"tcp://127.0.0.1:{free_port()}"
    d.start(control=control)
    avm = sim(d)
    try:
        d.stop()
        version = d.store().set_policy("vm-1", {**FAST, "threshold": 0.6})
        d.start(control=control)
        wait_until(lambda: avm.policy and avm.policy["version"] == version, what="the policy pushed on reconnect")
        wait_until(lambda: d.thread.call(lambda: d.thread.server.avms["avm-1"].acked_version) == version,
                   what="its acknowledgement")
        client = d.connect()
        client.sendall(b"x\n")
        assert read_line(client) == b"data: x\n"
        client.close()
    finally:
        avm.stop()
        d.stop()


def test_a_nonce_answers_one_report_only(dep):
    """Item 10: a second report (new seq, valid signature) on an answered nonce is refused."""
    raw = RawAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public)
    nonce = raw.session.nonce
    raw.send(raw.session.report(content(), nonce=nonce))
    first = raw.expect("ack")
    assert first["accepted"] is True and first["nonce"] != nonce
    raw.send(raw.session.report(content(), nonce=nonce))
    again = raw.expect("ack")
    assert (again["accepted"], again["reason"], again["detail"]) == (False, "stale", "nonce was answered before")
    raw.send(raw.session.report(content(), nonce=first["nonce"]))  # the nonce REM-S gave back works once
    assert raw.expect("ack")["accepted"] is True
    assert dep.metric("vims_reports_rejected_total", reason="stale") == 1
    raw.close()


def test_a_gate_that_cannot_listen_holds_back_no_other_vm(tmp_path):
    """Item 5: vm-1's gate port is taken: vm-2 still gets the new policy and its gate; vm-1's error is
    counted, recorded for `vims rems status` and retried until the port is free."""
    import socket

    d = Deployment(tmp_path, vms=2, policy=FAST)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", d.ports["vm-1"]))
    squatter.listen()
    d.start()
    try:
        server = d.thread.server
        assert d.metric("vims_gate_listening", vm="vm-1") == 0
        assert d.metric("vims_gate_listening", vm="vm-2") == 1
        version = d.store().set_policy("vm-2", {**FAST, "threshold": 0.7})
        d.store().set_policy("vm-1", {**FAST, "threshold": 0.7})
        wait_until(lambda: d.thread.call(lambda: server.policies["vm-2"]["version"]) == version,
                   what="vm-2's new policy applied")
        assert d.metric("vims_gate_bind_failures_total", vm="vm-1") == 1  # once per error, not per retry
        wait_until(lambda: {r["vm_id"]: r for r in d.store().status()}["vm-1"]["last_decision"],
                   what="the gate error recorded")
        status = {r["vm_id"]: r for r in d.store().status()}
        assert status["vm-1"]["last_decision"]["kind"] == "gate_error"
        assert str(d.ports["vm-1"]) in status["vm-1"]["last_decision"]["reason"]
        squatter.close()
        wait_until(lambda: d.metric("vims_gate_listening", vm="vm-1") == 1, what="vm-1's gate retried")
        assert read_all(d.connect("vm-1")).startswith(b"VIMS DENY")  # its A-VM is not running: refused
    finally:
        squatter.close()
        d.stop()


def test_history_stays_bounded_under_a_flood(tmp_path):
    """Item 6: fresh CURVE keys by the hundred and a stream of accepted reports leave a bounded history:
    refusals are all counted but recorded at a bounded rate and capped; old documents are dropped."""
    import zmq

    d = Deployment(tmp_path, vms=1, policy={**FAST, "history_documents": 3})
    d.start(prune_every_s=0.2, max_unattributed=20)
    ctx = zmq.Context()
    socks = []
    try:
        for _ in range(150):
            public, secret = zmq.curve_keypair()
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = d.keys.public.encode(), public, secret
            s.connect(d.endpoint)
            socks.append(s)
        wait_until(lambda: d.metric("vims_reports_rejected_total", reason="unenrolled") >= 150,
                   what="every handshake refused")
        raw = RawAvm(d.avms["vm-1"], d.endpoint, d.keys.public)
        for _ in range(10):
            raw.send(raw.session.report(content()))
            assert raw.expect("ack")["accepted"] is True
        raw.close()

        def counts():
            db = sqlite3.connect(d.db)
            try:
                return db.execute("SELECT SUM(vm_id IS NULL), SUM(vm_id = 'vm-1' AND status = 'accepted'), "
                                  "SUM(document IS NOT NULL AND vm_id = 'vm-1') FROM reports").fetchone()
            finally:
                db.close()

        wait_until(lambda: counts()[0] <= 20 and counts()[2] == 3, what="the history pruned")
        assert counts()[1] == 10  # every accepted report keeps its row (digest, verdict, reason)
        assert d.metric("vims_history_pruned_total", what="documents") >= 7
    finally:
        for s in socks:
            s.close()
        ctx.term()
        d.stop()


def test_prune_applies_each_vms_retention(tmp_path):
    """Item 6: rows older than a VM's history_days go; other VMs' rows and young rows stay."""
    from vims.remote.store import Store

    store = Store(tmp_path / "h.sqlite")
    now = 1_800_000_000.0
    for vm, age_days in (("vm-a", 10), ("vm-a", 1), ("vm-b", 10)):
        store.record_report(avm_id=None, vm_id=vm, seq=None, status="rejected", reason="stale",
                            document="{}", received_at=now - age_days * 86400)
        store.record_decision(vm_id=vm, conn_id="1", kind="deny", reason="x", at=now - age_days * 86400)
    out = store.prune({"vm-a": (5.0, 0), "vm-b": (30.0, 1)}, max_unattributed=0, now=now)
    assert out == {"reports": 1, "decisions": 1, "documents": 1, "unattributed": 0, "verifiers": 0}
    left = store.db.execute("SELECT vm_id, document FROM reports ORDER BY id").fetchall()
    assert [tuple(r) for r in left] == [("vm-a", None), ("vm-b", "{}")]
    store.close()


def test_gate_connections_per_vm_are_capped(tmp_path):
    """Item 13: past the cap a connection is refused with the reason and counted; closing one frees a slot."""
    d = Deployment(tmp_path, vms=1, policy=FAST)
    d.start(max_connections_per_vm=3)
    try:
        with sim(d):
            held = []
            for i in range(3):
                c = d.connect()
                c.sendall(b"%d\n" % i)
                assert read_line(c) == b"data: %d\n" % i
                held.append(c)
            assert read_all(d.connect()).startswith(b"VIMS DENY too many connections from VM vm-1 (limit 3)")
            assert d.metric("vims_gate_refused_total", reason="busy") == 1
            held.pop().close()
            wait_until(lambda: d.thread.call(lambda: d.thread.server.gate.active["vm-1"]) == 2,
                       what="the closed connection's slot freed")
            c = d.connect()
            c.sendall(b"again\n")
            assert read_line(c) == b"data: again\n"
            for h in [*held, c]:
                h.close()
    finally:
        d.stop()


def test_refusals_beyond_the_record_rate_are_summed_up_not_dropped(dep):
    """Item 6: refusals of fresh keys past UNATTRIBUTED_PER_S are counted, and the next recorded one says
    how many were not recorded: records plus the sums account for every refusal."""
    import secrets

    from vims.remote.server import UNATTRIBUTED_PER_S

    server = dep.thread.server

    def refuse() -> None:
        frames = [b"1.0", b"1", b"vims", b"127.0.0.1", b"", b"CURVE", secrets.token_bytes(32)]
        assert server._zap_reply(frames)[2] == b"400"

    def burst() -> None:
        for _ in range(50):
            refuse()

    dep.thread.call(burst)
    time.sleep(1.1)
    dep.thread.call(refuse)
    def recorded() -> list[str]:
        return [t for (t,) in dep.store().db.execute(
            "SELECT detail FROM reports WHERE reason = 'unenrolled' ORDER BY id")]

    # Written in order: once the last refusal's record (the summing one) is there, all are.
    rows = wait_until(lambda: (r := recorded()) and "more refusals" in r[-1] and r, what="the summing record")
    import re

    summed = sum(int(m.group(1)) for t in rows for m in [re.search(r"\((\d+) more refusals", t)] if m)
    assert len(rows) + summed == 51 == dep.metric("vims_reports_rejected_total", reason="unenrolled")
    assert len(rows) <= 3 * UNATTRIBUTED_PER_S + 1


def test_a_message_of_many_big_frames_is_refused_and_the_server_carries_on(dep):
    """Item 15: 150 frames of 1 MiB from an enrolled A-VM are refused as malformed with their count.

    (libzmq hands a multipart message over whole: REM-S holds it once, briefly; only an enrolled key
    gets past the handshake to send one.)"""
    import zmq

    from vims.remote.protocol import MAX_MESSAGE

    raw = RawAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public)
    raw.sock.send_multipart([zmq.Frame(b"x" * MAX_MESSAGE)] * 150, copy=False)
    wait_until(lambda: dep.metric("vims_reports_rejected_total", reason="malformed") == 1, what="the refusal")
    rows = wait_until(lambda: dep.store().db.execute(
        "SELECT detail FROM reports WHERE reason = 'malformed'").fetchall(), what="the refusal recorded")
    assert rows[0][0] == "150 frames, expected 1"
    raw.send(raw.session.report(content()))
    assert raw.expect("ack")["accepted"] is True
    raw.close()


def test_the_avm_outbox_is_bounded_and_says_so():
    """Item 15: with REM-S away, reports queue up to OUTBOX_MAX; one more is refused and counted."""
    from vims.remote.client import OUTBOX_MAX, AvmClient
    from vims.remote.keys import AvmIdentity, ServerKeys

    client = AvmClient(AvmIdentity.generate("avm-1"), "tcp://127.0.0.1:9", ServerKeys.generate().public)
    client.session.policy = {"version": 1, "interval_s": 1.0}
    client.session.vm_id = "vm-1"
    queued = [client.send_report(content()) for _ in range(OUTBOX_MAX)]
    assert all(doc is not None for doc in queued)
    assert client.send_report(content()) is None
    assert client.errors["outbox_full"] == 1
