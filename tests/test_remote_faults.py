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
            assert 'vims_history_writable 0' in dep.scrape()
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
