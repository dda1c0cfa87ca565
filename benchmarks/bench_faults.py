"""Fault benchmark of REM-S on loopback: time from fault to cut, allows that should not have been, fuzzing.

For each fault, one VM with a simulated A-VM (:class:`vims.remote.simavm.SimulatedAvm`, real CURVE) has
one relayed client connection open; the fault is injected and the time until the client reads ``VIMS
CUT`` is measured against the policy's deadline plus one interval. Then a new client connects while
the fault lasts: an allow is counted as one that should not have been (must be 0). A fault can bite
after its injection (a full database still takes the writes that fit its last pages), so "within"
judges the time from the later of the injection and the last accepted report: the deadline plus one
interval, no slack.

Faults: the database locked by another connection (during cut and report), full (SQLite's own
``SQLITE_FULL``: no page may be added) and read-only (``query_only`` on REM-S's connection), the A-VM killed, the
collector silent (reports say ``collector.alive`` false), a failing check (report evidence), six
clients that never read beside the one being measured, REM-S stopped mid-connection (restarted after).

Then N fuzzed control-channel messages (mutated envelopes and reports from an enrolled A-VM) and N
fuzzed collector messages (to :class:`vims.collector.stream.BatchReceiver`), seeded: crashes (the
server's internal errors, exceptions out of ``recv``) and refusals by reason.

Usage::

    python benchmarks/bench_faults.py            # N = 50000 (100,000 messages in all)
    python benchmarks/bench_faults.py --quick    # N = 500, a few seconds of faults
    python benchmarks/bench_faults.py --json
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from vims.collector.stream import BatchReceiver, encode_batch
from vims.remote.protocol import example_report
from vims.remote.simavm import SimulatedAvm
from vims.remote.testing import Deployment, RawAvm, read_line, wait_until

POLICY = {"interval_s": 0.3, "deadline_s": 1.5, "attest_timeout_s": 3.0}


def _open_client(dep: Deployment) -> socket.socket:
    client = dep.connect(timeout=20)
    client.sendall(b"ping\n")
    if read_line(client) != b"data: ping\n":
        raise RuntimeError("healthy VM's client not let through")
    return client


def _time_to_cut(client: socket.socket, t0: float) -> float | None:
    data = b""
    while b"VIMS CUT" not in data:
        chunk = client.recv(65536)
        if not chunk:
            return None if b"VIMS CUT" not in data else time.monotonic() - t0
        data += chunk
    return time.monotonic() - t0


def _allowed(dep: Deployment) -> bool:
    try:
        c = dep.connect(timeout=10)
        c.sendall(b"probe\n")
        return read_line(c).startswith(b"data:")
    except OSError:
        return False


def _fault(name: str, tmp: Path, inject: Any, restore: Any = None) -> dict[str, Any]:
    dep = Deployment(tmp / name, vms=1, policy=POLICY)
    dep.start()
    avm = SimulatedAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public).start()
    state: dict[str, Any] = {"dep": dep, "avm": avm}
    try:
        avm.wait_policy(20)
        wait_until(lambda: dep.thread.call(lambda: dep.thread.server.avms["avm-1"].acked_version), what="ack")
        client = _open_client(dep)
        t0 = time.monotonic()
        inject(state)
        cut = _time_to_cut(client, t0)
        cut_at = time.monotonic()
        server = dep.thread.server if dep.thread is not None else None
        last_ok = server.avms["avm-1"].last_ok if server is not None else None
        # A fault may bite after its injection (a full database still takes writes that fit its pages):
        # REM-S's promise runs from the last report it accepted.
        since_ok = None if cut is None else cut_at - max(t0, last_ok or t0)
        bad = 0 if state.get("no_probe") else int(_allowed(dep))
        if restore is not None:
            restore(state)
    finally:
        avm.stop()
        dep.stop()
    bound = POLICY["deadline_s"] + POLICY["interval_s"]
    return {"fault": name, "cut_s": cut, "since_last_accepted_s": since_ok, "bound_s": bound,
            "within": since_ok is not None and since_ok <= bound, "wrongly_allowed": bad}


def _lock(state: dict[str, Any]) -> None:
    state["locker"] = sqlite3.connect(state["dep"].db, isolation_level=None)
    state["locker"].execute("BEGIN EXCLUSIVE")


def _unlock(state: dict[str, Any]) -> None:
    state["locker"].execute("ROLLBACK")
    state["locker"].close()


def _on_writer(state: dict[str, Any], pragma: str) -> None:
    """Run ``pragma`` on REM-S's own history connection (SQLite serialises it with the writer thread;
    the writer's queue may be held by a write it retries, so not through the queue)."""
    state["dep"].thread.server.history._store.db.execute(pragma)


def _db_full(state: dict[str, Any]) -> None:
    """SQLite's own "database or disk is full": no page may be added beyond those it has."""
    pages = sqlite3.connect(state["dep"].db).execute("PRAGMA page_count").fetchone()[0]
    _on_writer(state, f"PRAGMA max_page_count = {pages}")


def _db_read_only(state: dict[str, Any]) -> None:
    _on_writer(state, "PRAGMA query_only = ON")


def _db_writable(state: dict[str, Any]) -> None:
    _on_writer(state, "PRAGMA query_only = OFF")
    _on_writer(state, "PRAGMA max_page_count = 1073741823")


def _kill_avm(state: dict[str, Any]) -> None:
    state["avm"].stop()


def _collector_silent(state: dict[str, Any]) -> None:
    state["avm"].collector_alive = False


def _failing_check(state: dict[str, Any]) -> None:
    state["avm"].failing_check = "kernel-text"


def _non_readers(state: dict[str, Any]) -> None:
    dep = state["dep"]
    state["slow"] = []
    for _ in range(6):
        c = _open_client(dep)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        state["slow"].append(c)
    state["avm"].silent = True


def _stop_server(state: dict[str, Any]) -> None:
    state["dep"].stop()
    state["no_probe"] = True


def faults(tmp: Path) -> list[dict[str, Any]]:
    return [
        _fault("database locked", tmp, _lock, _unlock),
        _fault("database full", tmp, _db_full, _db_writable),
        _fault("database read-only", tmp, _db_read_only, _db_writable),
        _fault("A-VM killed", tmp, _kill_avm),
        _fault("collector silent", tmp, _collector_silent),
        _fault("failing check", tmp, _failing_check),
        _fault("six non-reading clients", tmp, _non_readers),
        _fault("REM-S stopped", tmp, _stop_server),
    ]


def _mutate(rng: random.Random, obj: Any, depth: int = 0) -> Any:
    choices = [None, True, -1, 2**70, 1e308, "x" * rng.randint(0, 50), [], {}, "\n", 0.5]
    if isinstance(obj, dict) and obj and depth < 4:
        out = dict(obj)
        key = rng.choice(list(out))
        if rng.random() < 0.2:
            del out[key]
        else:
            out[key] = _mutate(rng, out[key], depth + 1) if rng.random() < 0.5 else rng.choice(choices)
        return out
    return rng.choice(choices)


def fuzz_control(tmp: Path, n: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    dep = Deployment(tmp / "fuzz-control", vms=1, policy=POLICY)
    dep.start()
    raw = RawAvm(dep.avms["vm-1"], dep.endpoint, dep.keys.public)
    try:
        for i in range(n):
            frame = json.loads(raw.session.report({k: v for k, v in example_report(time=time.time()).items()
                                                   if k in ("behaviour", "checks", "events", "collector")}))
            kind = rng.random()
            if kind < 0.1:
                data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            elif kind < 0.2:
                data = json.dumps(frame).encode().replace(b"1", b"1e400", 1)
            else:
                data = json.dumps(_mutate(rng, frame), allow_nan=True).encode()
            raw.send(data)
            if i % 200 == 199:
                raw.drain()
        raw.drain()
        alive = False
        for _ in range(5):  # the drained acks carried fresh nonces: retry with the one each answer brings
            raw.send(raw.session.report({k: v for k, v in example_report(time=time.time()).items()
                                         if k in ("behaviour", "checks", "events", "collector", "measured_at",
                                                  "model")}))
            final = raw.session.next_seq - 1
            end = time.monotonic() + 120
            while time.monotonic() < end:
                ack = raw.expect("ack", 120)
                if ack.get("seq") == final:
                    break
            if ack.get("accepted") is True:
                alive = True
                break
        server = dep.thread.server
        reasons = dep.thread.call(lambda: {dict(k).get("reason", ""): v for k, v in
                                           server.metrics.values.get("vims_reports_rejected_total", {}).items()})
        crashes = dep.metric("vims_internal_errors_total")
        reasons["accepted"] = dep.metric("vims_reports_accepted_total", vm="vm-1")
    finally:
        raw.close()
        dep.stop()
    return {"messages": n, "crashes": int(crashes), "server_alive": alive, "refused": reasons}


def fuzz_collector(n: int, seed: int) -> dict[str, Any]:
    import pyarrow as pa

    rng = random.Random(seed)
    payload = encode_batch(pa.record_batch({"x": [1, 2]}))
    crashes = 0
    ctx = zmq.Context.instance()
    with BatchReceiver("tcp://127.0.0.1:*") as rx:
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(rx.endpoint)
        header = {"sender": "vm-1", "seq": 0, "kind": "event", "rows": 2}
        for i in range(n):
            h = _mutate(rng, dict(header, seq=i)) if rng.random() < 0.8 else dict(header, seq=i)
            body = payload if rng.random() < 0.7 else payload[: rng.randint(0, len(payload))]
            frames = [b"vims/1", json.dumps(h, allow_nan=True).encode(), body]
            if rng.random() < 0.05:
                frames = frames[: rng.randint(0, 2)] or [b""]
            push.send_multipart(frames)
            try:
                while rx.recv(timeout=0) is not None:
                    pass
            except Exception:
                crashes += 1
        end = time.monotonic() + 5
        while time.monotonic() < end and rx.rejected + sum(s.received for s in rx.senders.values()) < n:
            try:
                rx.recv(timeout=0.1)
            except Exception:
                crashes += 1
        push.close()
        return {"messages": n, "crashes": crashes, "refused": dict(rx.refused),
                "accepted": sum(s.received for s in rx.senders.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small N and only two faults (a few seconds)")
    ap.add_argument("-n", type=int, default=None, help="fuzzed messages per channel")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    n = args.n or (500 if args.quick else 50000)
    with tempfile.TemporaryDirectory() as tmp:
        rows = faults(Path(tmp))[:2] if args.quick else faults(Path(tmp))
        control = fuzz_control(Path(tmp), n, args.seed)
    collector = fuzz_collector(n, args.seed)
    result = {"policy": POLICY, "faults": rows, "fuzz_control": control, "fuzz_collector": collector}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'fault':<26} {'cut after (s)':>14} {'after last accepted':>20} {'bound (s)':>10} {'within':>7} "
          f"{'wrongly allowed':>16}")
    for r in rows:
        cut = "never" if r["cut_s"] is None else f"{r['cut_s']:.2f}"
        since = "-" if r["since_last_accepted_s"] is None else f"{r['since_last_accepted_s']:.2f}"
        print(f"{r['fault']:<26} {cut:>14} {since:>20} {r['bound_s']:>10.2f} {r['within']!s:>7} "
              f"{r['wrongly_allowed']:>16}")
    for name, f in (("control", control), ("collector", collector)):
        print(f"fuzz {name}: {f['messages']} messages, {f['crashes']} crashes, refused {f['refused']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
