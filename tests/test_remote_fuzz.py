"""Hypothesis-generated malformed messages, sent over real sockets, never stop REM-S.

Each example goes through a real ZeroMQ connection (an enrolled A-VM's key, so the message reaches the
parser) or a raw TCP connection; afterwards a healthy A-VM must still get its client through the gate.
"""

from __future__ import annotations

import contextlib
import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vims.errors import InputError
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


@st.composite
def mangled_reports(draw):
    """A report with one field removed or replaced by an arbitrary value (so never valid)."""
    report = example_report(vm_id="vm-1", avm_id="avm-1", seq=draw(st.integers(1, 2**62)))
    key = draw(report_keys)
    if draw(st.booleans()):
        report.pop(key, None)
        if key in ("nonce", "policy_version"):  # optional or nullable: make it wrong instead
            report[key] = "zz"
    else:
        report[key] = draw(json_values.filter(lambda v: not isinstance(v, dict | list) or v == []))
        if key in ("nonce", "policy_version"):
            report[key] = report[key] if isinstance(report[key], bool | float) else "zz"
    return report


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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(frame=frames, extra=st.lists(st.binary(max_size=20), max_size=2))
def test_malformed_frames_never_stop_the_server(dep, frame, extra):
    _, raw = dep
    raw.send([frame, *extra] if extra else frame)
    raw.drain()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(report=mangled_reports())
def test_signed_but_malformed_reports_are_refused(dep, report):
    _, raw = dep
    try:
        sig = sign_report(report, raw.session.signing_key)
    except ValueError:  # not encodable canonically (cannot come out of json.loads either)
        return
    raw.send(b'{"v":1,"type":"report","sender":"avm-1","seq":1,"body":' + canonical(report)
             + b',"sig":"' + sig.encode() + b'"}')
    ack = raw.expect("ack")
    assert ack["accepted"] is False


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=2000))
def test_raw_bytes_on_every_port(dep, data):
    d, _ = dep
    server = d.thread.server
    control_port = int(d.endpoint.rsplit(":", 1)[1])
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


def test_after_all_that_a_valid_exchange_still_works(dep):
    d, raw = dep
    raw.drain()
    assert d.metric("vims_reports_rejected_total", reason="malformed") > 0
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
