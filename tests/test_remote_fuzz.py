"""Hypothesis-generated malformed messages, sent over real sockets, never stop REM-S.

Each example goes through a real ZeroMQ connection (an enrolled A-VM's key, so the message reaches the
parser) or a raw TCP connection. Each test checks its own outcome, so it passes or fails alone: the
mangled reports are fresh and otherwise valid (current time, the latest nonce, the next sequence number,
the current policy version), so REM-S can refuse them only for their form, and says which field; after
the malformed frames and raw bytes a valid report is still accepted, a client still gets through the
gate, and no message made REM-S fail inside (``vims_internal_errors_total`` stays 0).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vims.errors import InputError
from vims.remote.client import Sealed
from vims.remote.policy import DEFAULT_POLICY, normalise_policy
from vims.remote.protocol import ProtocolError, canonical, check_report, envelope, example_report, sign_report
from vims.remote.simavm import SimulatedAvm
from vims.remote.testing import Deployment, RawAvm, read_line, wait_until

POLICY = {"interval_s": 0.5, "deadline_s": 3.0, "attest_timeout_s": 5.0}


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("rems-fuzz"), vms=1, policy=POLICY)
    d.start()
    raw = RawAvm(d.avms["vm-1"], d.endpoint, d.keys.public)
    yield d, raw
    raw.close()
    d.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20,
)

report_keys = st.sampled_from(["vm_id", "avm_id", "seq", "time", "nonce", "interval_s", "behaviour", "checks",
                               "events", "collector", "policy_version"])

# -- what the protocol's text (vims.remote.protocol) says each field may hold, written out here -----------
scalars = json_values.filter(lambda v: not isinstance(v, dict | list) or v == [])


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _not(ok):
    """Scalar JSON values (and the empty list, the empty object) that ``ok`` does not admit."""
    return (scalars | st.just({})).filter(lambda v: not ok(v))


counts = st.fixed_dictionaries({"seen": st.just(1), "dropped": st.just(0), "missing": st.just(0)})
#: For each field of a report, values it must never hold (wrong type, out of range, wrong inner form).
INVALID = {
    "vm_id": _not(lambda v: isinstance(v, str) and 0 < len(v) <= 64) | st.text(min_size=65, max_size=80),
    "avm_id": _not(lambda v: isinstance(v, str) and 0 < len(v) <= 64) | st.text(min_size=65, max_size=80),
    "seq": _not(lambda v: _int(v) and 0 < v < 2**63) | st.integers(-(2**70), 0) | st.integers(2**63, 2**70),
    "time": _not(lambda v: _num(v) and v > 0) | st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
    "nonce": _not(lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{2,256}", v))),
    "interval_s": _not(lambda v: _num(v) and v > 0) | st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
    "policy_version": _not(lambda v: v is None or (_int(v) and v >= 0)) | st.integers(-(2**40), -1),
    "behaviour": _not(lambda v: False) | st.one_of(
        st.builds(lambda s: {"score": s, "threshold": 0.5}, _not(lambda v: v is None or (_num(v) and 0 <= v <= 1))),
        st.builds(lambda t: {"score": 0.9, "threshold": t}, _not(_num)),
        st.builds(lambda p: {"score": 0.9, "threshold": 0.5, "top_processes": p}, _not(lambda v: v == [])),
        st.builds(lambda pid: {"score": 0.9, "threshold": 0.5,
                               "top_processes": [{"pid": pid, "comm": "x", "score": 0.1}]}, _not(_int))),
    "checks": _not(lambda v: v == []) | st.one_of(
        st.builds(lambda c: [c], _not(lambda v: False)),
        st.builds(lambda s: [{"check": "kernel-text", "target": "_text", "status": s}],
                  _not(lambda v: isinstance(v, str) and v in ("pass", "fail", "error"))),
        st.builds(lambda t: [{"check": "kernel-text", "target": "_text", "status": "pass", "ts_ns": t}],
                  _not(lambda v: v is None or (_int(v) and 0 <= v < 2**63)))),
    "events": _not(lambda v: False) | st.one_of(
        st.builds(lambda k, v: {**{"seen": 1, "dropped": 0, "missing": 0}, k: v},
                  st.sampled_from(["seen", "dropped", "missing"]), _not(lambda v: _int(v) and v >= 0)),
        st.builds(lambda i: {"seen": 1, "dropped": 0, "missing": 0, "interval": i}, _not(lambda v: v is None))),
    "collector": _not(lambda v: v == {}) | st.builds(lambda a: {"alive": a}, _not(lambda v: v is None
                                                                               or isinstance(v, bool))),
}
REQUIRED = ("vm_id", "avm_id", "seq", "time", "interval_s", "behaviour", "checks", "events", "collector")


def fresh_report(raw: RawAvm, nonce: str | None = None) -> dict[str, Any]:
    """A valid report as the real client stamps it now: next seq, latest nonce, current policy version."""
    s = raw.session
    assert s.policy is not None
    return example_report(vm_id="vm-1", avm_id="avm-1", seq=s.next_seq, time=time.time(),
                          nonce=nonce or s.nonce, interval_s=float(s.policy["interval_s"]),
                          policy_version=s.policy["version"])


def send_report(raw: RawAvm, report: dict[str, Any]) -> dict[str, Any]:
    """Sign and send ``report`` on the A-VM's key; the ack REM-S answers it with.

    Acks of earlier frames (a fuzzed report envelope is answered too) are passed over: REM-S's ack names
    the report's ``seq`` when it is an integer in range, else None.
    """
    text = canonical(report)
    raw.send(raw.session.frame(Sealed(report, text, sign_report(text, raw.session.signing_key))))
    seq = report.get("seq")
    seq = seq if _int(seq) and 0 <= seq < 2**63 else None
    while True:
        ack = raw.expect("ack")
        if ack.get("seq") == seq:
            return ack


def a_valid_report_is_accepted(d: Deployment, raw: RawAvm) -> None:
    """REM-S still serves: a fresh hello gets a policy, a valid report on its nonce is accepted."""
    raw.drain()
    raw.send(raw.session.hello())
    raw.expect("policy")
    # a sequence number no fuzzed envelope above will have drawn (they get small or extreme ones)
    raw.session.next_seq = max(raw.session.next_seq, time.time_ns() // 1000)
    ack = send_report(raw, fresh_report(raw))
    assert ack["accepted"] is True, ack
    raw.session.next_seq += 1
    assert d.metric("vims_internal_errors_total") == 0


@st.composite
def mangled_reports(draw):
    """``(key, report)``: a valid report with ``key`` removed or set to a value it may never hold."""
    key = draw(report_keys)
    if key in REQUIRED and draw(st.booleans()):
        return key, None
    return key, draw(INVALID[key])


frames = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b'{"v":1,"type":"report","sender":"avm-1","seq":1,"body":{"time":Infinity}}',
                     b"[" * 5000, b'{"v":1,"type":"hello","sender":"avm-1","seq":1e400,"body":{}}']),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["v", "type", "sender", "seq", "body", "sig"]), json_values,
                    max_size=6).map(lambda d: json.dumps(d).encode()),
    st.builds(lambda kind, body, sig: envelope(kind, "avm-1", 1, body, sig),
              st.sampled_from(["hello", "policy_ack", "report", "nonce", "bogus"]),
              st.dictionaries(st.text(max_size=8), json_values, max_size=4),
              st.none() | st.text(max_size=130)),
)


@settings(max_examples=300, deadline=None)
@given(doc=json_values | st.dictionaries(report_keys, json_values, max_size=11)
       | st.dictionaries(st.sampled_from([*DEFAULT_POLICY, "version"]), json_values
                         | st.dictionaries(st.sampled_from(list(DEFAULT_POLICY["tracing"])), json_values)
                         | st.lists(st.dictionaries(st.sampled_from(["check", "every_s"]), json_values)),
                         max_size=8))
def test_report_and_policy_checks_only_ever_refuse_cleanly(doc):
    try:
        check_report(doc)
    except ProtocolError as exc:
        assert exc.reason == "malformed"
    with contextlib.suppress(InputError):
        normalise_policy(doc)


def test_malformed_frames_never_stop_the_server(dep):
    d, raw = dep
    refused = [d.metric("vims_reports_rejected_total", reason="malformed")]
    surely_malformed = [0]  # frames that are not even one JSON object (by Python's own json)

    @settings(max_examples=150, deadline=None)
    @given(frame=frames, extra=st.lists(st.binary(max_size=20), max_size=2))
    def send(frame, extra):
        raw.send([frame, *extra] if extra else frame)
        try:
            surely_malformed[0] += bool(extra) or not isinstance(json.loads(frame), dict)
        except (ValueError, RecursionError):
            surely_malformed[0] += 1
        raw.drain()

    send()
    a_valid_report_is_accepted(d, raw)  # after every frame above (one connection keeps their order)
    assert d.metric("vims_reports_rejected_total", reason="malformed") - refused[0] >= surely_malformed[0] > 0


def test_signed_but_malformed_reports_are_refused_for_their_form(dep):
    d, raw = dep
    a_valid_report_is_accepted(d, raw)  # a fresh nonce, and the proof that such a report is accepted

    @settings(max_examples=100, deadline=None)
    @given(mangled=mangled_reports())
    def send(mangled):
        key, value = mangled
        report = fresh_report(raw)
        if value is None:
            del report[key]
        else:
            report[key] = value
        ack = send_report(raw, report)
        assert ack["accepted"] is False and ack["reason"] == "malformed", (key, value, ack)
        assert str(ack["detail"]).startswith(key), (key, value, ack["detail"])

    send()
    a_valid_report_is_accepted(d, raw)


@pytest.mark.parametrize("status", [{}, []])
def test_a_check_status_that_is_an_object_is_refused(status):
    report = example_report()
    report["checks"][0]["status"] = status
    with pytest.raises(ProtocolError, match=r"malformed: checks\[0\]\.status"):
        check_report(report)


def test_raw_bytes_on_every_port(dep):
    d, raw = dep
    server = d.thread.server
    control_port = int(d.endpoint.rsplit(":", 1)[1])

    @settings(max_examples=30, deadline=None)
    @given(data=st.binary(min_size=1, max_size=2000))
    def send(data):
        for port in (control_port, server.metrics_bound, d.ports["vm-1"]):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                try:
                    s.sendall(data)
                    if port == d.ports["vm-1"]:
                        continue  # the gate reads nothing before its decision: just hang up
                    s.shutdown(socket.SHUT_WR)
                    s.settimeout(10)
                    while s.recv(65536):
                        pass
                except OSError:
                    pass

    send()
    a_valid_report_is_accepted(d, raw)
    assert d.line("vims_internal_errors_total") + " 0" in d.scrape()  # the metrics port still answers over HTTP


def test_after_all_that_a_valid_exchange_still_works(dep):
    d, raw = dep
    raw.drain()
    assert d.metric("vims_internal_errors_total") == 0
    avm = SimulatedAvm(d.avms["vm-1"], d.endpoint, d.keys.public).start()
    try:
        avm.wait_policy(20)
        wait_until(lambda: avm.session.accepted >= 1, what="an accepted report")
        client = d.connect("vm-1")
        client.sendall(b"still here\n")
        assert read_line(client) == b"data: still here\n"
        client.close()
    finally:
        avm.stop()
