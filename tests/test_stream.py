"""Arrow batches over real ZeroMQ sockets: round trip, gaps, overflow, CURVE."""

from __future__ import annotations

import socket
import threading

import pyarrow as pa
import pytest
import zmq

from vims.collector.stream import BatchReceiver, BatchSender, curve_keypair, decode_batch, encode_batch
from vims.errors import InputError
from vims.schemas import EVENT_SCHEMA, conform


def _events(n: int, start: int = 0) -> pa.Table:
    return conform(pa.table({
        "seq": pa.array(range(start, start + n), pa.uint64()),
        "ts_ns": pa.array([1_700_000_000_000_000_000 + i for i in range(n)], pa.uint64()),
        "vm_id": ["vm"] * n,
        "vcpu": pa.array([0] * n, pa.uint16()),
        "pid": pa.array([42] * n, pa.int32()),
        "tgid": pa.array([42] * n, pa.int32()),
        "comm": ["sh"] * n,
        "cr3": pa.array([0x1000] * n, pa.uint64()),
        "nr": pa.array([257] * n, pa.int32()),
        "args": pa.array([[1, 2, 3, 4, 5, 2**64 - 1]] * n, pa.list_(pa.uint64(), 6)),
        "user_ip": pa.array([0x7F0000001234] * n, pa.uint64()),
        "path": ["/etc/shadow"] + [None] * (n - 1),
    }), EVENT_SCHEMA)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ipc_round_trip_keeps_schema_and_metadata() -> None:
    t = _events(5)
    back = decode_batch(encode_batch(t))
    assert back.equals(t) and back.schema.metadata == EVENT_SCHEMA.metadata


def test_batches_round_trip_in_order() -> None:
    with BatchReceiver("tcp://127.0.0.1:*") as rx:
        tx = BatchSender(rx.endpoint, sender="vm-a")
        for i in range(20):
            assert tx.send(_events(10, start=10 * i))
        got = [rx.recv(timeout=10) for _ in range(20)]
        stats = tx.close()
    assert all(m is not None for m in got)
    assert [m.seq for m in got if m] == list(range(20))
    table = pa.concat_tables([m.batch for m in got if m])
    assert table.schema.equals(EVENT_SCHEMA) and table["seq"].to_pylist() == list(range(200))
    assert rx.gaps == 0 and rx.senders["vm-a"].rows == 200 and rx.senders["vm-a"].received == 20
    assert stats == {"accepted": 20, "sent": 20, "dropped_batches": 0, "dropped_rows": 0}


def test_records_the_source_lost_travel_in_every_header() -> None:
    """A sender given its source's drop count (the plugin tracer's full rings) carries the running total
    as ``source_dropped``; the receiver keeps the latest per sender. A sender without one says nothing."""
    lost = [0]
    with BatchReceiver("tcp://127.0.0.1:*") as rx:
        tx = BatchSender(rx.endpoint, sender="vm-a", upstream_dropped=lambda: lost[0])
        plain = BatchSender(rx.endpoint, sender="vm-b")
        got = []
        for n in (0, 7, 3992):
            lost[0] = n
            assert tx.send(_events(1))
            got.append(rx.recv(timeout=10))
        assert plain.send(_events(1))
        other = rx.recv(timeout=10)
        tx.close()
        plain.close()
    assert [m.header["source_dropped"] for m in got if m] == [0, 7, 3992]
    assert rx.senders["vm-a"].source_dropped == 3992
    assert other is not None and "source_dropped" not in other.header and rx.senders["vm-b"].source_dropped == 0


def test_two_senders_are_counted_apart_and_gaps_found() -> None:
    ctx = zmq.Context.instance()
    with BatchReceiver("tcp://127.0.0.1:*") as rx:
        # A hand-made sender that skips sequence numbers 2 and 3, and one that does not.
        raw = ctx.socket(zmq.PUSH)
        raw.connect(rx.endpoint)
        payload = encode_batch(_events(1))
        for seq in (0, 1, 4, 5):
            raw.send_multipart([b"vims/1", f'{{"sender": "raw", "seq": {seq}, "kind": "event"}}'.encode(),
                                payload])
        raw.send_multipart([b"junk"])
        raw.send_multipart([b"vims/1", b"{not json", payload])
        raw.send_multipart([b"vims/1", b'{"sender": "raw", "seq": 6}', payload])
        # One connection keeps its order: once seq 6 is in, both bad messages were seen.
        got = [rx.recv(timeout=10) for _ in range(5)]
        good = BatchSender(rx.endpoint, sender="good")
        good.send(_events(3))
        got.append(rx.recv(timeout=10))
        good.close()
        raw.close(0)
    assert all(m is not None for m in got)
    gaps = {(m.sender, m.seq): m.gap for m in got if m}
    assert gaps[("raw", 4)] == 2 and gaps[("good", 0)] == 0
    assert rx.senders["raw"].gaps == 2 and rx.senders["good"].gaps == 0 and rx.gaps == 2
    assert rx.rejected == 2
    assert rx.stats()["raw"]["received"] == 5


def test_overflow_is_counted_and_never_blocks() -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    # Nobody listens yet: ZeroMQ holds `hwm` messages, our queue 4 more, the rest must be dropped.
    tx = BatchSender(endpoint, sender="vm-b", queue_size=4, hwm=1)
    done = threading.Event()
    results: list[bool] = []

    def burst() -> None:
        results.extend(tx.send(_events(7)) for _ in range(100))
        done.set()

    threading.Thread(target=burst, daemon=True).start()
    assert done.wait(30), "send() blocked on a full queue"
    assert results.count(False) == tx.dropped_batches > 0
    assert tx.dropped_rows == 7 * tx.dropped_batches
    # Now a receiver appears: what was kept arrives, what was dropped shows as gaps, with the counts.
    with BatchReceiver(endpoint) as rx:
        assert tx.flush(timeout=20)
        kept = results.count(True)
        got = [rx.recv(timeout=10) for _ in range(kept)]
        assert all(m is not None for m in got)
        last = max((m for m in got if m), key=lambda m: m.seq)
        # Every dropped batch is a gap, except those dropped after the last one that got through.
        assert rx.gaps + (99 - last.seq) == tx.dropped_batches
        assert rx.senders["vm-b"].dropped_batches == last.header["dropped_batches"] <= tx.dropped_batches
    stats = tx.close()
    assert stats["sent"] + stats["dropped_batches"] == stats["accepted"] == 100


def test_close_without_receiver_counts_what_is_left() -> None:
    tx = BatchSender(f"tcp://127.0.0.1:{_free_port()}", sender="vm-c", queue_size=50, hwm=1)
    for _ in range(10):
        assert tx.send(_events(2))
    stats = tx.close(timeout=0.2)
    assert stats["accepted"] == 10 and stats["sent"] + stats["dropped_batches"] == 10
    assert stats["dropped_batches"] >= 8 and stats["dropped_rows"] == 2 * stats["dropped_batches"]


def test_curve_round_trip_and_refusals() -> None:
    server_pub, server_sec = curve_keypair()
    client_pub, client_sec = curve_keypair()
    with BatchReceiver("tcp://127.0.0.1:*", secret_key=server_sec, allowed_keys=[client_pub]) as rx:
        tx = BatchSender(rx.endpoint, sender="vm-d", server_key=server_pub, public_key=client_pub,
                         secret_key=client_sec)
        tx.send(_events(4))
        msg = rx.recv(timeout=10)
        assert msg is not None and msg.batch.num_rows == 4 and msg.sender == "vm-d"
        tx.close()
        # A client with another key, and a client without CURVE, get nothing through.
        stranger = BatchSender(rx.endpoint, sender="stranger", server_key=server_pub)
        plain = BatchSender(rx.endpoint, sender="plain")
        stranger.send(_events(1))
        plain.send(_events(1))
        assert rx.recv(timeout=1.5) is None
        assert "stranger" not in rx.senders and "plain" not in rx.senders
        stranger.close(timeout=0.1)
        plain.close(timeout=0.1)


def test_collect_keys_made_once_are_the_ones_the_avm_allows(tmp_path) -> None:
    """`vims collect --server-key avm.public.json --keys c.json`: keys made 0600 on first use and reused;
    the A-VM's --collector-key file (its public half) lets exactly that collector through."""
    import json

    from vims.collector.trace_cli import _curve
    from vims.remote.keys import AvmIdentity, load_server_public

    avm = AvmIdentity.generate("avm-1")
    avm_public = avm.write(tmp_path / "avm")
    first = _curve(str(avm_public), tmp_path / "c.json", quiet=True)
    assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o600
    assert _curve(str(avm_public), tmp_path / "c.json", quiet=True) == first  # reused, not made anew
    allowed = load_server_public(tmp_path / "c.public.json")
    assert json.loads((tmp_path / "c.public.json").read_text())["kind"] == "vims-collector-public"
    with BatchReceiver("tcp://127.0.0.1:*", secret_key=avm.curve_secret, allowed_keys=[allowed]) as rx:
        tx = BatchSender(rx.endpoint, sender="vm-k", **first)
        tx.send(_events(3))
        assert (m := rx.recv(timeout=10)) is not None and m.batch.num_rows == 3
        tx.close()
        other = BatchSender(rx.endpoint, sender="other", **_curve(avm.curve_public, tmp_path / "o.json", quiet=True))
        other.send(_events(1))
        assert rx.recv(timeout=1.5) is None and "other" not in rx.senders
        other.close(timeout=0.1)
    with pytest.raises(InputError, match="--keys needs --server-key"):
        _curve(None, tmp_path / "c.json", quiet=True)


def test_curve_without_client_list_accepts_any_key_holder() -> None:
    server_pub, server_sec = curve_keypair()
    with BatchReceiver("tcp://127.0.0.1:*", secret_key=server_sec) as rx:
        tx = BatchSender(rx.endpoint, sender="vm-e", server_key=server_pub)
        tx.send(_events(2))
        assert (m := rx.recv(timeout=10)) is not None and m.batch.num_rows == 2
        tx.close()


def test_bad_keys_and_endpoints_are_input_errors() -> None:
    with pytest.raises(InputError, match="server_key"):
        BatchSender("tcp://127.0.0.1:1", sender="x", server_key="short")
    with pytest.raises(InputError, match="cannot bind"):
        BatchReceiver("nonsense://here")


def test_allow_listed_receiver_counts_refused_keys() -> None:
    """Item 2: only allow-listed collector keys get through; a refused key is counted by reason."""
    server_pub, server_sec = curve_keypair()
    client_pub, client_sec = curve_keypair()
    with BatchReceiver("tcp://127.0.0.1:*", secret_key=server_sec, allowed_keys=[client_pub]) as rx:
        stranger = BatchSender(rx.endpoint, sender="vm-x", kind="check", server_key=server_pub)
        stranger.send(_events(1))
        assert rx.recv(timeout=1.5) is None
        assert rx.refused["unknown_key"] >= 1 and rx.senders == {}
        stranger.close(timeout=0.1)
        good = BatchSender(rx.endpoint, sender="vm-x", server_key=server_pub, public_key=client_pub,
                           secret_key=client_sec)
        good.send(_events(3))
        assert (m := rx.recv(timeout=10)) is not None and m.batch.num_rows == 3
        good.close()


def test_malformed_messages_are_refused_and_counted_never_raised() -> None:
    """Item 2: bad headers (1e400, a string count, missing fields) and bad Arrow payloads are counted."""
    payload = encode_batch(_events(2))
    bad = [
        ([b"vims/1", b'{"sender": "a", "seq": 1e400, "kind": "event", "rows": 2}', payload], "bad_header"),
        ([b"vims/1", b'{"sender": "a", "seq": 0, "kind": "event", "rows": "2"}', payload], "bad_header"),
        ([b"vims/1", b'{"sender": "a", "seq": 0, "kind": "event", "rows": 2, "dropped_rows": "x"}', payload],
         "bad_header"),
        ([b"vims/1", b'{"sender": "a", "seq": 0, "kind": "event", "rows": 2, "source_dropped": -1}', payload],
         "bad_header"),
        ([b"vims/1", b'{"seq": 0, "rows": 2}', payload], "bad_header"),
        ([b"vims/1", b'{"sender": "a", "rows": 2}', payload], "bad_header"),
        ([b"vims/1", b'{"sender": "a", "seq": NaN, "rows": 2}', payload], "bad_header"),
        ([b"vims/1", b"[1, 2]", payload], "bad_header"),
        ([b"vims/1", b'{"sender": "a", "seq": 0, "kind": "check", "rows": 2}', b"not arrow"], "bad_payload"),
        ([b"vims/1", b'{"sender": "a", "seq": 0, "kind": "check", "rows": 2}', payload[:-9]], "bad_payload"),
        ([b"vims/1", b'{"sender": "a", "seq": 0, "kind": "check", "rows": 5}', payload], "bad_payload"),
        ([b"other", b"{}", payload], "not_vims"),
    ]
    ctx = zmq.Context.instance()
    with BatchReceiver("tcp://127.0.0.1:*") as rx:
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(rx.endpoint)
        for frames, _ in bad:
            push.send_multipart(frames)
        push.send_multipart([b"vims/1", b'{"sender": "a", "seq": 0, "kind": "event", "rows": 2}', payload])
        msg = rx.recv(timeout=10)
        assert msg is not None and msg.seq == 0 and msg.batch.num_rows == 2
        expected: dict[str, int] = {}
        for _, reason in bad:
            expected[reason] = expected.get(reason, 0) + 1
        assert dict(rx.refused) == expected and rx.rejected == len(bad)
        push.close()
