"""REM-S over real sockets and a real SQLite file: gating, refusals, cuts, restarts, policy pushes.

Nothing here asserts a duration: waits are generous bounds, and "within the deadline" is checked on the
recorded state (the decision's reason and the ages the server saw).
"""

from __future__ import annotations

import json
import time

import pytest

from vims.net import free_port
from vims.remote.client import AvmClient
from vims.remote.keys import AvmIdentity
from vims.remote.protocol import envelope, example_report, parse_envelope, sign_report
from vims.remote.simavm import SimulatedAvm
from vims.remote.store import Store
from vims.remote.testing import Deployment, RawAvm, read_all, read_line, wait_until

FAST = {"interval_s": 0.3, "deadline_s": 1.5, "attest_timeout_s": 5.0}


@pytest.fixture
def dep(tmp_path):
    d = Deployment(tmp_path, vms=2, policy=FAST)
    d.start()
    yield d
    d.stop()


def sim(dep: Deployment, vm: str = "vm-1", **kwargs) -> SimulatedAvm:
    client = SimulatedAvm(dep.avms[vm], dep.endpoint, dep.keys.public, **kwargs).start()
    client.wait_policy(20)
    wait_until(lambda: dep.thread.call(lambda: dep.thread.server.avms[dep.avms[vm].avm_id].acked_version),
               what="policy acknowledged")
    return client


def content(**kw) -> dict:
    report = example_report(time=time.time(), **kw)
    return {k: report[k] for k in ("behaviour", "checks", "events", "collector", "measured_at", "model")}


def test_healthy_vm_client_is_let_through(dep):
    with sim(dep):
        client = dep.connect("vm-1")
        client.sendall(b"hello service\n")
        assert read_line(client) == b"data: hello service\n"
        client.sendall(b"second line\n")
        assert read_line(client) == b"data: second line\n"
        client.close()
    history = dep.store().history("vm-1")
    assert history["decisions"][-1]["kind"] == "allow"
    assert history["decisions"][-1]["report_seq"] is not None
    assert dep.line("vims_decisions_total", kind="allow") + " 1" in dep.scrape()


def test_unhealthy_vm_is_refused_with_a_readable_reason(dep):
    with sim(dep, score=0.2) as avm:
        assert read_all(dep.connect("vm-1")).startswith(b"VIMS DENY behaviour score 0.200 < threshold 0.500")
        avm.score = 0.99
        avm.failing_check = "syscall-table"
        line = read_all(dep.connect("vm-1"))
        assert line.startswith(b"VIMS DENY check syscall-table fail") and line.count(b"\n") == 1
    # vm-2's A-VM never connected: refused, and vm-1's A-VM cannot speak for it.
    assert read_all(dep.connect("vm-2")).startswith(b"VIMS DENY A-VM avm-2 is not connected")
    kinds = [d["kind"] for d in dep.store().history("vm-1")["decisions"]]
    assert kinds == ["deny", "deny"]


def test_bad_signature_and_unsigned_reports_are_refused_and_counted(dep):
    raw = RawAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public)
    frame = json.loads(raw.session.report(content()))
    frame["body"]["behaviour"]["score"] = 1.0  # changed after signing
    raw.send(json.dumps(frame).encode())
    ack = raw.expect("ack")
    assert ack["accepted"] is False and ack["reason"] == "bad_signature"
    # Signed by a key that is not the one enrolled for this A-VM.
    stranger = RawAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public, hello=False)
    stranger.session.policy, stranger.session.vm_id = raw.session.policy, "vm-1"
    stranger.session.signing_key = AvmIdentity.generate("avm-1").signing_key
    stranger.session.next_seq = raw.session.next_seq
    stranger.send(stranger.session.report(content(), nonce=raw.session.nonce))
    assert stranger.expect("ack")["reason"] == "bad_signature"
    unsigned = json.loads(raw.session.report(content()))
    del unsigned["sig"]
    raw.send(json.dumps(unsigned).encode())
    assert raw.expect("ack")["reason"] == "unsigned"
    raw.send(raw.session.report(content()))
    assert raw.expect("ack")["accepted"] is True  # and the server kept serving
    assert dep.metric("vims_reports_rejected_total", reason="bad_signature") == 2
    assert dep.metric("vims_reports_rejected_total", reason="unsigned") == 1
    assert dep.store().counts()["reports"] == {"accepted": 1, "rejected:bad_signature": 2, "rejected:unsigned": 1}
    raw.close()
    stranger.close()


def test_replayed_and_out_of_sequence_reports_are_refused(dep):
    raw = RawAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public)
    first = raw.session.report(content())
    raw.send(first)
    assert raw.expect("ack")["accepted"] is True
    raw.send(first)
    ack = raw.expect("ack")
    assert (ack["accepted"], ack["reason"]) == (False, "replayed")
    raw.session.next_seq -= 1  # a new report reusing the sequence number
    raw.send(raw.session.report(content()))
    assert raw.expect("ack")["reason"] == "out_of_sequence"
    assert dep.metric("vims_reports_rejected_total", reason="replayed") == 1
    assert dep.metric("vims_reports_rejected_total", reason="out_of_sequence") == 1
    raw.close()


def test_report_for_an_old_or_foreign_nonce_is_refused(dep):
    raw = RawAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public)
    old = raw.session.nonce
    raw.send(raw.session.report(content(), nonce="ab" * 16))  # never issued
    ack = raw.expect("ack")
    assert ack["reason"] == "stale" and "not issued" in ack["detail"]
    time.sleep(FAST["deadline_s"] + 0.5)  # let the policy's nonce grow older than the deadline
    raw.send(raw.session.report(content(), nonce=old))
    ack = raw.expect("ack")
    assert ack["reason"] == "stale" and "nonce issued" in ack["detail"]
    # A connecting client is not let through by a report that answers an earlier nonce.
    client = dep.connect("vm-1")
    request = raw.expect("nonce")
    raw.send(raw.session.report(content(), nonce=ack["nonce"]))  # fresh, but not the connection's
    assert raw.expect("ack")["accepted"] is True
    raw.send(raw.session.report(content(), nonce=old))
    assert raw.expect("ack")["reason"] == "stale"
    assert read_all(client).startswith(b"VIMS DENY no fresh report from A-VM avm-1")
    assert request["nonce"] != old
    # Answering the connection's nonce with a report dated long ago: refused at once, reason given.
    client = dep.connect("vm-1")
    request = raw.expect("nonce")
    frame = json.loads(raw.session.report(content(), nonce=request["nonce"]))
    frame["body"]["time"] -= 600
    frame["sig"] = sign_report(frame["body"], raw.session.signing_key)
    raw.send(json.dumps(frame).encode())
    assert raw.expect("ack")["reason"] == "stale"
    assert read_all(client).startswith(b"VIMS DENY report refused (stale: report made 600")
    assert dep.metric("vims_reports_rejected_total", reason="stale") == 4
    raw.close()


def test_unenrolled_key_is_refused_at_the_handshake_and_counted(dep):
    rogue = SimulatedAvm(AvmIdentity.generate("avm-1"), dep.endpoint, dep.keys.public).start()
    try:
        wait_until(lambda: dep.metric("vims_reports_rejected_total", reason="unenrolled") >= 1,
                   what="the refusal to be counted")
        assert rogue.policy is None
        # Recorded by the history writer after it was counted: wait for the row.
        rows = wait_until(lambda: dep.store().db.execute(
            "SELECT detail FROM reports WHERE reason = 'unenrolled'").fetchall(), what="the refusal recorded")
        assert rows and "unknown CURVE key" in rows[0][0]
        assert read_all(dep.connect("vm-1")).startswith(b"VIMS DENY")
    finally:
        rogue.stop()
    assert dep.line("vims_reports_rejected_total", reason="unenrolled") in dep.scrape()


def test_silent_avm_gets_its_connection_cut_within_the_deadline(dep):
    avm = sim(dep)
    try:
        client = dep.connect("vm-1")
        client.sendall(b"ping\n")
        assert read_line(client) == b"data: ping\n"
        avm.silent = True
        rest = read_all(client)
        assert rest.startswith(b"\nVIMS CUT no fresh report within 1.5 s")
    finally:
        avm.stop()
    store = dep.store()
    # The sockets are closed first, the cut recorded after: wait for the record.
    wait_until(lambda: store.history("vm-1")["decisions"][0]["kind"] == "cut", what="the cut to be recorded")
    cut = store.history("vm-1")["decisions"][0]
    last_ok = store.db.execute("SELECT MAX(received_at) FROM reports WHERE status = 'accepted'").fetchone()[0]
    assert cut["kind"] == "cut"
    # Cut because the last report aged past the deadline: not before it did (how soon after is a
    # duration, which belongs in benchmarks/, not here).
    assert cut["time"] + 0.05 >= last_ok + FAST["deadline_s"]
    assert dep.metric("vims_open_connections") == 0


def test_failing_report_cuts_an_open_connection(dep):
    with sim(dep) as avm:
        client = dep.connect("vm-1")
        client.sendall(b"ping\n")
        assert read_line(client) == b"data: ping\n"
        avm.failing_check = "kernel-text"
        assert read_all(client).startswith(b"\nVIMS CUT check kernel-text fail on simulated")
        avm.failing_check = None
        again = dep.connect("vm-1")  # healthy again: let through again
        again.sendall(b"x\n")
        assert read_line(again) == b"data: x\n"
        again.close()
    wait_until(lambda: len(dep.store().history("vm-1")["decisions"]) >= 3, what="the decisions to be recorded")
    assert [d["kind"] for d in dep.store().history("vm-1")["decisions"]][:3][::-1] == ["allow", "cut", "allow"]


def test_policy_change_is_pushed_and_applies(dep):
    with sim(dep) as avm:
        version = dep.store().set_policy("vm-1", {**FAST, "threshold": 0.99})
        wait_until(lambda: avm.policy and avm.policy["version"] == version, what="the pushed policy")
        wait_until(lambda: dep.thread.call(lambda: dep.thread.server.avms["avm-1"].acked_version) == version,
                   what="the acknowledgement")
        assert read_all(dep.connect("vm-1")).startswith(b"VIMS DENY behaviour score 0.950 < threshold 0.990")
    status = {r["vm_id"]: r for r in dep.store().status()}
    assert status["vm-1"]["acked_version"] == version == 2


def test_revocation_cuts_and_refuses(dep):
    with sim(dep) as avm:
        client = dep.connect("vm-1")
        client.sendall(b"a\n")
        assert read_line(client) == b"data: a\n"
        dep.store().revoke("avm-1")
        assert b"VIMS CUT A-VM avm-1 revoked" in read_all(client)
        assert read_all(dep.connect("vm-1")).startswith(b"VIMS DENY no A-VM enrolled for VM vm-1")
        wait_until(lambda: dep.metric("vims_reports_rejected_total", reason="revoked") >= 1,
                   what="a report of the revoked A-VM refused")
        assert avm.session.accepted >= 1


def test_restarted_server_keeps_its_history_and_sequence(tmp_path):
    dep = Deployment(tmp_path, vms=1, policy=FAST)
    dep.start()
    raw = RawAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public)
    accepted = raw.session.report(content())
    raw.send(accepted)
    assert raw.expect("ack")["accepted"]
    raw.send(accepted)
    assert raw.expect("ack")["reason"] == "replayed"
    client = dep.connect("vm-1")
    raw.send(raw.session.report(content(), nonce=raw.expect("nonce")["nonce"]))
    client.sendall(b"x\n")
    assert read_line(client) == b"data: x\n"
    client.close()
    wait_until(lambda: dep.metric("vims_open_connections") == 0, what="the connection to close")
    before = dep.store().history("vm-1")
    assert [d["kind"] for d in before["decisions"]] == ["allow"]
    assert [r["status"] for r in before["reports"]] == ["accepted", "rejected", "accepted"]
    raw.close()
    dep.stop()

    dep.start()
    after = dep.store().history("vm-1")
    assert after == before
    raw = RawAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public)
    raw.send(accepted)  # still a replay after the restart
    assert raw.expect("ack")["reason"] == "replayed"
    raw.send(raw.session.report(content()))  # the policy told the A-VM where its sequence stands
    assert raw.expect("ack")["accepted"]
    raw.close()
    dep.stop()


def test_server_answers_garbage_and_keeps_serving(dep):
    raw = RawAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public)
    raw.send(b"\x00\x01 not json")
    assert raw.expect("error")["reason"] == "malformed"
    raw.send([b"two", b"frames"])
    assert raw.expect("error")["reason"] == "malformed"
    raw.send(envelope("report", "avm-9", 99, {}))
    assert raw.expect("error")["reason"] == "wrong_sender"
    assert parse_envelope(raw.session.hello())["type"] == "hello"
    raw.close()
    with sim(dep):
        client = dep.connect("vm-1")
        client.sendall(b"ok\n")
        assert read_line(client) == b"data: ok\n"


def test_avm_client_rides_through_a_server_restart(tmp_path):
    dep = Deployment(tmp_path, vms=1, policy=FAST)
    control = f"tcp://127.0.0.1:{free_port()}"
    dep.start(control=control)
    avm = sim(dep)
    try:
        first = _ping(dep)
        assert read_line(first) == b"data: ping\n"
        dep.stop()
        assert read_all(first) == b"\nVIMS CUT REM-S shutting down\n"
        dep.start(control=control)
        # The client reconnects by itself; its first report carries a nonce of the old run and is
        # refused as stale, whose answer brings a fresh nonce: then it is accepted again.
        before = avm.session.accepted
        wait_until(lambda: avm.session.accepted > before + 1, what="reports accepted after the restart")
        second = _ping(dep)
        assert read_line(second) == b"data: ping\n"
        second.close()
        wait_until(lambda: dep.metric("vims_open_connections") == 0, what="the connection to close")
    finally:
        avm.stop()
        dep.stop()
    assert [d["kind"] for d in Store(dep.db).history("vm-1")["decisions"]] == ["allow", "cut", "allow"]


def _ping(dep: Deployment):
    client = dep.connect("vm-1")
    client.sendall(b"ping\n")
    return client


def test_a_report_naming_another_vm_is_refused(dep):
    raw = RawAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public)
    frame = json.loads(raw.session.report(content()))
    frame["body"]["vm_id"] = "vm-2"  # correctly signed by avm-1, about a VM it does not watch
    frame["sig"] = sign_report(frame["body"], raw.session.signing_key)
    raw.send(json.dumps(frame).encode())
    ack = raw.expect("ack")
    assert ack["reason"] == "wrong_sender" and "enrolled as avm-1/vm-1" in ack["detail"]
    assert dep.store().history("vm-2")["reports"] == []
    raw.close()


def test_unreachable_service_means_refusal(tmp_path):
    dep = Deployment(tmp_path, vms=1, policy=FAST)
    dep.start(demo_service=False, service=("127.0.0.1", free_port()))
    try:
        with sim(dep):
            assert read_all(dep.connect("vm-1")).startswith(b"VIMS DENY protected service unavailable")
    finally:
        dep.stop()


def test_client_survives_a_broken_agent(dep):
    calls = []

    def source(nonce):
        calls.append(nonce)
        if len(calls) % 2:
            raise RuntimeError("agent bug")
        return content(behaviour={"score": float("nan"), "threshold": 0.5}) if len(calls) % 4 == 2 else content()

    client = AvmClient(dep.avms["vm-1"], dep.endpoint, dep.keys.public, source=source,
                       on_event=lambda kind, body: 1 / 0).start()
    try:
        wait_until(lambda: client.session.accepted >= 2, what="reports accepted despite the agent's bugs")
        assert client.errors["source_raised"] and client.errors["unencodable_report"]
        assert client.errors["on_event_raised"]
    finally:
        client.stop()
