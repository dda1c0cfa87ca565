"""REM-S pieces without the network: keys, signatures, report checks, policies, the history file."""

from __future__ import annotations

import json
import stat

import pytest

from vims.errors import InputError, VimsError
from vims.remote.keys import AvmIdentity, AvmPublic, ServerKeys
from vims.remote.policy import evaluate, normalise_policy
from vims.remote.protocol import ProtocolError, check_report, example_report, sign_report, verify_report
from vims.remote.store import Store


def test_key_files_are_owner_only_and_load_back(tmp_path):
    server = ServerKeys.generate()
    server.write(tmp_path / "rems")
    avm = AvmIdentity.generate("avm-7")
    public = avm.write(tmp_path / "avm")
    for path in [*(tmp_path / "rems").iterdir(), *(tmp_path / "avm").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((tmp_path / "avm").stat().st_mode) == 0o700
    assert ServerKeys.load(tmp_path / "rems" / "rems.secret.json") == server
    assert AvmIdentity.load(tmp_path / "avm" / "avm.secret.json") == avm
    assert AvmPublic.load(public) == avm.public
    with pytest.raises(VimsError, match="exists"):
        avm.write(tmp_path / "avm")


def test_broken_key_file_names_the_file(tmp_path):
    path = tmp_path / "avm.public.json"
    path.write_text(json.dumps({"avm_id": "a", "curve_public": "short", "sign_public": "00"}))
    with pytest.raises(InputError, match=r"avm\.public\.json: curve_public"):
        AvmPublic.load(path)


def test_signature_covers_every_field():
    ident = AvmIdentity.generate("avm-1")
    report = example_report()
    sig = sign_report(report, ident.signing_key)
    verify_report(report, sig, ident.signing_key.public_key())
    tampered = json.loads(json.dumps(report))
    tampered["behaviour"]["score"] = 1.0
    with pytest.raises(ProtocolError) as bad:
        verify_report(tampered, sig, ident.signing_key.public_key())
    assert bad.value.reason == "bad_signature"
    with pytest.raises(ProtocolError) as unsigned:
        verify_report(report, None, ident.signing_key.public_key())
    assert unsigned.value.reason == "unsigned"
    other = AvmIdentity.generate("avm-1")
    with pytest.raises(ProtocolError):
        verify_report(report, sign_report(report, other.signing_key), ident.signing_key.public_key())


@pytest.mark.parametrize("change", [
    {"behaviour": {"score": 1.5, "threshold": 0.5}},
    {"checks": [{"check": "x", "target": "y", "status": "maybe"}]},
    {"events": {"seen": -1, "dropped": 0, "missing": 0}},
    {"time": float("nan")},
    {"nonce": "not hex"},
    {"seq": True},
])
def test_malformed_reports_are_named(change):
    with pytest.raises(ProtocolError) as exc:
        check_report(example_report(**change))
    assert exc.value.reason == "malformed"


def test_decision_needs_every_check_and_the_threshold():
    policy = normalise_policy({"threshold": 0.9, "checks": [{"check": "kernel-text", "every_s": 5}]})
    assert evaluate(example_report(), policy)[0]
    failing = example_report(checks=[{"check": "kernel-text", "target": "_text+0x1000", "status": "fail",
                                      "detail": "page differs"}])
    allowed, reason = evaluate(failing, policy)
    assert not allowed and "kernel-text fail" in reason and "\n" not in reason
    low = example_report(behaviour={"score": 0.89, "threshold": 0.1, "top_processes": []})
    assert not evaluate(low, policy)[0]


def test_policy_validation_names_the_field():
    with pytest.raises(InputError, match="threshold"):
        normalise_policy({"threshold": 2})
    with pytest.raises(InputError, match="unknown policy keys: colour"):
        normalise_policy({"colour": "red"})
    with pytest.raises(InputError, match="tracing: field 'window_ms'"):
        normalise_policy({"tracing": {"window_ms": 2000, "period_ms": 1000}})


def test_not_a_database_is_a_user_error(tmp_path):
    path = tmp_path / "r.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InputError, match="not a REM-S database"):
        Store(path)


def test_ids_with_a_trailing_newline_are_refused():
    """Item 14: ids are matched whole (fullmatch): no newline smuggled into logs or output."""
    from vims.errors import InputError
    from vims.remote.keys import check_id

    assert check_id("avm-1", "A-VM id") in (None, "avm-1")
    for bad in ("avm-1\n", "avm-1\nVIMS ALLOW", "\navm-1"):
        with pytest.raises(InputError):
            check_id(bad, "A-VM id")


def test_rems_home_and_database_are_private(tmp_path):
    """Item 8: the REM-S home is created 0700 and rems.sqlite (and its WAL) 0600."""
    import stat

    from vims.remote.store import Store

    home = tmp_path / "home" / "rems"
    Store(home / "rems.sqlite").close()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for part in home.iterdir():
        assert stat.S_IMODE(part.stat().st_mode) == 0o600, part


def test_metrics_endpoint_caps_its_clients_and_times_out_whole_requests():
    """Item 13: beyond the cap a connection is closed at once; a request trickled line by line ends."""
    import asyncio
    import contextlib

    from vims.remote.metrics import Metrics

    async def scenario() -> tuple[bytes, bytes, float, int]:
        m = Metrics(max_clients=2, request_timeout_s=0.5)
        server = await m.serve()
        port = server.sockets[0].getsockname()[1]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.05)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        refused = await asyncio.wait_for(r.read(), 10)
        # A slowloris: a header line every 0.2 s never completes the request; the server hangs up.
        slow_r, slow_w = idle[0]
        slow_w.write(b"GET /metrics HTTP/1.1\r\n")
        sent = 0
        for _ in range(10):
            with contextlib.suppress(ConnectionError):
                slow_w.write(b"X-A: b\r\n")
            sent += 1
            await asyncio.sleep(0.2)
            if slow_r.at_eof():
                break
        trickled = await asyncio.wait_for(slow_r.read(), 10)
        for _, wr in idle:
            wr.close()
        w.close()
        server.close()
        return refused, trickled, m.get("vims_metrics_refused_total"), sent

    refused, trickled, count, sent = asyncio.run(scenario())
    assert refused == b"" and count == 1
    assert sent < 10  # hung up while header lines were still trickling in
    assert b"200 OK" not in trickled
