"""One owner of a report's stamp (seq, time, nonce, ...), and one encoding and signature per report sent."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from vims.avm.agent import Agent
from vims.avm.remote_sink import RemoteSink
from vims.models.persist import save_model
from vims.models.stide import Stide
from vims.remote import protocol
from vims.remote.client import AvmClient
from vims.remote.keys import AvmIdentity
from vims.remote.testing import Deployment, read_all, wait_until

STAMP = ("vm_id", "avm_id", "seq", "time", "nonce", "interval_s", "policy_version")


@pytest.fixture(scope="module")
def model() -> Stide:
    rng = np.random.default_rng(0)
    return Stide(k=4).fit([list(rng.integers(0, 10, 200)) for _ in range(10)])


def test_without_rems_the_agent_stamps_the_builders_content_itself(model) -> None:
    agent = Agent(model, vm_id="vm-3", avm_id="avm-3", workers=1, interval_s=2.0)
    shown: list[dict] = []
    agent.sinks.append(shown.append)
    first, second = agent.report(), agent.report()
    assert shown == [first, second]
    assert [first[k] for k in ("vm_id", "avm_id", "seq", "nonce", "interval_s", "policy_version")] == \
        ["vm-3", "avm-3", 1, None, 2.0, None]
    assert second["seq"] == 2 and second["time"] >= second["measured_at"]
    assert not set(STAMP) & set(agent.last_content or {})  # the builder makes the content only
    protocol.check_report(first)


def test_before_rems_policy_nothing_is_sent_and_the_local_stamp_stamps(model) -> None:
    identity = AvmIdentity.generate("avm-1")
    client = AvmClient(identity, "tcp://127.0.0.1:9", "x" * 40)  # never started: no policy ever comes
    try:
        agent = Agent(model, vm_id="vm-1", avm_id="avm-1", workers=1)
        RemoteSink(agent, client)
        report = agent.report()
        assert report["seq"] == 1 and report["nonce"] is None and report["policy_version"] is None
        assert client.errors["no_policy_yet"] == 1 and client._outbox.empty()
    finally:
        client.stop()


def test_a_report_to_rems_is_encoded_and_signed_once_and_shown_as_sent(tmp_path, model, monkeypatch) -> None:
    dep = Deployment(tmp_path, vms=1, policy={"interval_s": 0.3, "deadline_s": 5.0, "attest_timeout_s": 5.0})
    dep.start()
    identity = dep.avms["vm-1"]
    save_model(model, tmp_path / "model.skops")  # REM-S accepts reports that name their model file
    encoded: list[tuple[str, dict]] = []
    real = protocol.canonical

    def counted(obj):
        name = threading.current_thread().name  # the A-VM's threads only: REM-S runs in this process too
        if name == "MainThread" or name.startswith("avm-client"):
            encoded.append((name, obj))
        return real(obj)

    client = AvmClient(identity, dep.endpoint, dep.keys.public)
    try:
        with Agent(tmp_path / "model.skops", vm_id="vm-1", avm_id=identity.avm_id, workers=1,
                   interval_s=60) as agent:
            shown: list[dict] = []
            agent.sinks.append(shown.append)
            RemoteSink(agent, client)
            client.start()
            client.wait_policy(20)
            monkeypatch.setattr(protocol, "canonical", counted)
            for n in range(1, 4):
                agent.report()
                wait_until(lambda n=n: client.session.accepted == n, what=f"report {n} accepted")
            assert len(encoded) == 3  # one encoding (signed and framed as it is) per report
            read_all(dep.connect("vm-1"))  # REM-S asks for a report with its nonce; the client answers
            wait_until(lambda: client.session.accepted == 4, what="the nonce answer accepted")
    finally:
        client.stop()
        dep.stop()
    assert len(encoded) == client.sent == 4 and all("behaviour" in doc for _, doc in encoded)
    assert encoded[-1][0].startswith("avm-client")  # the nonce answer, stamped in the client's thread
    # what the sinks got is the very document REM-S got: the session's stamp, nothing taken off or added
    assert [doc for _, doc in encoded[:3]] == shown
    policy_version = client.session.policy["version"]
    assert all(set(STAMP) <= set(r) and r["policy_version"] == policy_version for r in shown)
    history = {r["seq"]: r for r in dep.store().history("vm-1")["reports"]}
    assert {r["status"] for r in history.values()} == {"accepted"} and len(history) == 4
    assert [(history[r["seq"]]["nonce"], r["seq"]) for r in shown] == [(r["nonce"], r["seq"]) for r in shown]
    assert len({r["nonce"] for r in history.values()}) == 4  # each REM-S nonce answered once
    json.dumps(shown, allow_nan=False)
