"""The A-VM agent's ways in and out over real sockets: a collector in another process pushing events
(``vims avm run --pull``), and signed reports to a real REM-S that gates a client on them."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from vims.avm.agent import Agent
from vims.avm.ingest import ingest
from vims.avm.remote_sink import RemoteSink
from vims.collector.stream import BatchSender
from vims.events import example_events
from vims.models.persist import save_model
from vims.models.stide import Stide
from vims.net import free_port
from vims.remote.client import AvmClient
from vims.remote.testing import Deployment, read_all, read_line, wait_until

FAST = {"interval_s": 0.3, "deadline_s": 3.0, "attest_timeout_s": 5.0}


@pytest.fixture(scope="module")
def model() -> Stide:
    rng = np.random.default_rng(0)
    nxt = rng.integers(0, 20, size=(20, 2))
    traces = []
    for _ in range(30):
        c, t = 0, []
        for _ in range(200):
            c = int(nxt[c, rng.integers(2)])
            t.append(c)
        traces.append(t)
    model = Stide(k=4).fit(traces)
    model.normal_ = traces  # the traces themselves, for the tests to replay
    return model


def test_pulled_events_and_checks_are_scored_and_the_senders_drops_reported(model) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    stop = threading.Event()
    with Agent(model, workers=1, interval_s=60) as agent:
        receiver = threading.Thread(target=ingest, args=(agent, endpoint, stop))
        receiver.start()
        try:
            wait_until(lambda: agent.collector_health().get("endpoint") == endpoint, what="receiver bound")
            sender = BatchSender(endpoint, sender="vm-1", kind="event", queue_size=1000)
            checks = BatchSender(endpoint, sender="vm-1.checks", kind="check")
            seq = 0
            for trace in model.normal_[:10]:
                ev = example_events({7: trace}, start_seq=seq)
                seq += ev.num_rows
                assert sender.send(ev)
            checks.send(pa.table({"check": ["kernel-text"], "target": ["_text"], "status": ["fail"],
                                  "detail": ["page of do_sys_open changed"], "cost": ["deep"],
                                  "ts_ns": pa.array([time.time_ns()], pa.uint64())}))
            with sender._lock:  # as BatchSender.send does when its queue is full: a 5-event batch dropped
                sender._seq += 1
                sender.dropped_batches += 1
                sender.dropped_rows += 5
            assert sender.send(example_events({7: model.normal_[10][:10]}, start_seq=seq + 5))
            assert sender.flush(10) and checks.flush(10)
            sender.close()
            checks.close()
            wait_until(lambda: agent.pipeline.counts()["seen"] == 2010, what="every batch received")
            assert agent.pipeline.drain(20)
            report = agent.report()
        finally:
            stop.set()
            receiver.join(10)
    ev = report["events"]
    assert ev["seen"] == ev["scored"] == 2010
    assert ev["dropped"] == 5  # the collector's own count, carried in its batch headers
    assert ev["missing"] == 5  # and the same events as a hole in the event sequence numbers
    assert report["checks"] == [{"check": "kernel-text", "target": "_text", "status": "fail",
                                 "detail": "page of do_sys_open changed", "cost": "deep",
                                 "ts_ns": report["checks"][0]["ts_ns"]}]
    assert report["collector"]["senders"]["vm-1"]["received"] == 11
    assert report["collector"]["gaps"] == 1


def test_reports_reach_rems_which_gates_on_them(tmp_path, model, live_collector) -> None:
    dep = Deployment(tmp_path, vms=1, policy=FAST)
    dep.start()
    identity = dep.avms["vm-1"]
    try:
        save_model(model, tmp_path / "model.skops")  # REM-S accepts reports that name their model file
        with Agent(tmp_path / "model.skops", vm_id="vm-1", avm_id=identity.avm_id, workers=1,
                   interval_s=0.3) as agent, \
                live_collector(agent, model.normal_):
            client = AvmClient(identity, dep.endpoint, dep.keys.public)
            RemoteSink(agent, client)  # stamps, signs and sends every report
            client.start()
            client.wait_policy(20)
            stop = threading.Event()
            runner = threading.Thread(target=agent.run, kwargs={"stop": stop})
            runner.start()
            try:
                wait_until(lambda: len([r for r in dep.store().history("vm-1")["reports"]
                                        if r["status"] == "accepted"]) >= 2, what="reports accepted")
                sock = dep.connect("vm-1")  # REM-S asks the agent for a fresh report with its nonce
                sock.sendall(b"hello\n")
                assert read_line(sock) == b"data: hello\n"
                sock.close()
                # the VM turns anomalous: the next connection is refused, by behaviour
                odd = [100 + (i * 7) % 13 for i in range(300)]
                agent.send(example_events({8: odd}, start_seq=200), wait=10)
                time.sleep(0.7)
                line = read_all(dep.connect("vm-1"))
                assert line.startswith(b"VIMS DENY behaviour score"), line
            finally:
                stop.set()
                runner.join(10)
                client.stop()
    finally:
        dep.stop()
    history = dep.store().history("vm-1")
    assert {r["status"] for r in history["reports"]} == {"accepted"}
    assert [d["kind"] for d in reversed(history["decisions"])][:2] == ["allow", "deny"]


def test_bad_messages_are_counted_and_the_ingest_goes_on_and_a_silent_collector_is_not_alive(model) -> None:
    import json

    import zmq

    from vims.collector.stream import PROTOCOL

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    stop = threading.Event()
    with Agent(model, workers=1, interval_s=0.2) as agent:
        receiver = threading.Thread(target=ingest, args=(agent, endpoint, stop))
        receiver.start()
        ctx = zmq.Context.instance()
        raw = ctx.socket(zmq.PUSH)
        try:
            wait_until(lambda: agent.collector_health().get("endpoint") == endpoint, what="receiver bound")
            assert agent.collector_health()["alive"] is False  # nothing delivered yet
            raw.connect(endpoint)
            raw.send_multipart([PROTOCOL, b'{"sender": "x", "seq": 1e400}', b"not arrow"])
            raw.send_multipart([PROTOCOL, json.dumps({"sender": "x", "seq": 0, "kind": "check"}).encode(),
                                b""])
            wait_until(lambda: sum(agent.collector_health()["bad"].values()) + agent.collector_health()["rejected"]
                       >= 2, what="the bad messages counted")
            sender = BatchSender(endpoint, sender="vm-1", kind="event")
            assert sender.send(example_events({7: model.normal_[0]}))
            assert sender.flush(10)
            wait_until(lambda: agent.collector_health()["alive"], what="a good batch after the bad ones")
            sender.close()
            health = wait_until(lambda: (h := agent.collector_health())["alive"] is False and h, what="silence")
            assert health["last_batch_age_s"] >= 0.4  # rounded to the millisecond: 0.4003 reads 0.4
            assert health["state"].startswith("silent")
            assert receiver.is_alive()
        finally:
            raw.close(0)
            stop.set()
            receiver.join(10)


def test_no_scored_window_is_no_data_not_normal_and_the_report_names_its_model_and_time(model, tmp_path) -> None:
    import hashlib

    from vims.avm.report import summary_line
    from vims.models.persist import save_model

    path = tmp_path / "stide.skops"
    save_model(Stide(k=4).fit(model.normal_), path)
    with Agent(path, workers=1, interval_s=60) as agent:
        before = time.time()
        report = agent.report()
    beh = report["behaviour"]
    assert beh["score"] is None and beh["anomalous"] is None and beh["windows"] == 0
    assert "NO DATA" in summary_line(report)
    assert before <= report["measured_at"] <= report["time"]
    assert report["model"] == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "path": "stide.skops"}
