"""REM-S for fleets: several ``vims remote serve`` processes over one PostgreSQL, many simulated A-VMs.

A private PostgreSQL cluster (:class:`vims.remote.pgcluster.TempCluster`, Debian's server binaries) is
the shared store. Each run enrols ``--avms`` A-VMs (real keys, one gate port each), starts ``verifiers``
real ``vims remote serve`` processes on it (``--verifier-id v1..vN``, ``--lease-s``), and drives the
A-VMs from this process (CURVE DEALERs, the real protocol through
:class:`vims.remote.client.AvmSession`, one event loop): each reports every ``--interval`` seconds
(answering nonce requests at once), A-VM ``i`` is given the verifiers in the order starting at
``i mod N`` and fails over to the next when its verifier is silent for ``--failover`` seconds. Clients
connect to random VMs' gates at ``--rate`` a second; one VM in ten reports a failing score (its clients
must be refused).

Measured per run, from the store afterwards: reports sent, lost (not in the store at all), accepted,
refused (and why), mis-attributed (accepted under another A-VM or VM, or by a verifier the A-VM did not
send it to), decision latency (median, p99, as the gates recorded it: connect to decision, including the
nonce round trip to the A-VM), wrong decisions, CPU per verifier (% of one core) and of the simulator,
and the database's growth (bytes, extrapolated per hour).

The takeover run (2 verifiers) kills v1 with SIGKILL half-way: ``takeover`` says how long until every
A-VM v1 held had a report accepted by another verifier (``seconds_to_rehome``, with the lease period
and two lease periods to compare with), how many connections to those VMs were allowed in that time
without a fresh report accepted by their new verifier (must be 0), and the attempts' outcomes meanwhile.

Usage::

    python benchmarks/bench_remote_fleet.py --quick            # smoke run: 200 A-VMs, 1 and 2 verifiers, 10 s
    python benchmarks/bench_remote_fleet.py --avms 1000 2000 --seconds 40 --json
    python benchmarks/bench_remote_fleet.py --avms 2000 --verifiers 1 --write-group 1 64 --no-takeover
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from measure import cpu_seconds, pct  # benchmarks/measure.py (this script's folder)

from vims.net import free_port, free_ports
from vims.remote.client import AvmSession
from vims.remote.keys import AvmIdentity, ServerKeys
from vims.remote.pgcluster import TempCluster
from vims.remote.protocol import ProtocolError
from vims.remote.store import Store

UNHEALTHY_EVERY = 10


def healthy(vm_id: str) -> bool:
    return int(vm_id.split("-")[1]) % UNHEALTHY_EVERY != 0


@dataclass
class SimAvm:
    """One simulated A-VM: a DEALER to its current verifier, failing over on silence."""

    vm_id: str
    ident: AvmIdentity
    endpoints: list[str]
    verifier_ids: list[str]
    server_public: str
    ctx: zmq.asyncio.Context
    failover_s: float
    session: AvmSession = field(init=False)
    sock: Any = None
    current: int = 0
    sent: dict[int, tuple[str, float]] = field(default_factory=dict)  # seq -> (verifier id, monotonic time)
    unanswered_since: float | None = None
    failovers: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.session = AvmSession(self.ident, {"checks": ["kernel-text"]})

    async def connect(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_secretkey = self.ident.curve_secret.encode()
        sock.curve_publickey = self.ident.curve_public.encode()
        sock.curve_serverkey = self.server_public.encode()
        sock.connect(self.endpoints[self.current])
        self.sock = sock
        self.unanswered_since = None
        await self._send(self.session.hello())

    async def _send(self, frame: bytes) -> None:
        if self.unanswered_since is None:
            self.unanswered_since = time.monotonic()
        with contextlib.suppress(zmq.Again):
            await self.sock.send(frame, flags=zmq.NOBLOCK)

    def content(self) -> dict[str, Any]:
        score = 0.95 if healthy(self.vm_id) else 0.2
        return {"behaviour": {"score": score, "threshold": 0.5,
                              "top_processes": [{"pid": 1, "comm": "sim", "score": score, "evidence": []}]},
                "checks": [{"check": "kernel-text", "target": "_text", "status": "pass", "detail": None,
                            "ts_ns": time.time_ns()}],
                "events": {"seen": 1000, "dropped": 0, "missing": 0,
                           "interval": {"seen": 1000, "dropped": 0, "missing": 0}},
                "measured_at": time.time(), "model": {"sha256": "5" * 64, "path": "bench.skops"},
                "collector": {"sim": self.ident.avm_id, "alive": True}}

    async def report(self, nonce: str | None) -> None:
        if self.session.policy is None:
            return
        seq = self.session.next_seq
        frame = self.session.report(self.content(), nonce)
        self.sent[seq] = (self.verifier_ids[self.current], time.monotonic())
        await self._send(frame)

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        await self.connect()
        next_report = time.monotonic() + random.uniform(0, interval)
        while not stop.is_set():
            now = time.monotonic()
            if len(self.endpoints) > 1 and self.unanswered_since is not None and \
                    now - self.unanswered_since > self.failover_s:
                self.current = (self.current + 1) % len(self.endpoints)
                self.failovers += 1
                await self.connect()
                continue
            timeout = max(0.0, min(next_report - now, 0.5))
            if await self.sock.poll(int(timeout * 1000)):
                frame = await self.sock.recv()
                self.unanswered_since = None
                try:
                    events, replies = self.session.handle(frame)
                except ProtocolError:
                    continue
                for reply in replies:
                    await self._send(reply)
                for kind, body in events:
                    if kind == "policy":
                        if self.failovers:  # on a new verifier: report at once, on its nonce
                            await self.report(None)
                        self.ready.set()
                    elif kind == "nonce":
                        await self.report(body["nonce"])
            if time.monotonic() >= next_report:
                next_report += interval
                await self.report(None)
        self.sock.close(linger=0)


@dataclass
class Attempt:
    vm_id: str
    t0: float
    outcome: str = "error"


async def attempt(vm_id: str, port: int, out: list[Attempt]) -> None:
    rec = Attempt(vm_id, time.time())
    out.append(rec)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (OSError, TimeoutError):
        rec.outcome = "closed"
        return
    try:
        writer.write(f"ping {vm_id}\n".encode())
        line = await asyncio.wait_for(reader.readline(), 20)
        rec.outcome = ("allow" if line == f"data: ping {vm_id}\n".encode() else
                       "deny" if line.startswith(b"VIMS DENY") else "closed")
    except (OSError, TimeoutError):
        rec.outcome = "closed"
    finally:
        writer.close()


def enrol(url: str, n: int, policy: dict[str, Any]) -> tuple[dict[str, AvmIdentity], dict[str, int]]:
    store = Store(url)
    idents, ports = {}, {}
    for i, port in enumerate(free_ports(n)):
        vm_id = f"vm-{i + 1}"
        ident = AvmIdentity.generate(f"avm-{i + 1}")
        store.enroll(ident.public, vm_id, port, policy)
        idents[vm_id], ports[vm_id] = ident, port
    store.close()
    return idents, ports


def db_bytes(url: str) -> int:
    store = Store(url)
    try:
        return int(store._value("SELECT pg_database_size(current_database()) AS b"))
    finally:
        store.close()


async def one_run(args: argparse.Namespace, cluster: TempCluster, folder: Path, keys: ServerKeys, n_avms: int,
                  n_verifiers: int, kill: bool, group: int) -> dict[str, Any]:
    dbname = f"fleet_{n_avms}_{n_verifiers}_{int(kill)}_{group}"
    admin = Store(cluster.url())
    admin._exec(f"DROP DATABASE IF EXISTS {dbname}")
    admin._exec(f"CREATE DATABASE {dbname}")
    admin.close()
    url = cluster.url(dbname)
    policy = {"interval_s": args.interval, "deadline_s": 3 * args.interval, "attest_timeout_s": 5.0,
              "threshold": 0.5, "checks": [{"check": "kernel-text", "every_s": 10.0}]}
    t_enrol = time.monotonic()
    idents, ports = enrol(url, n_avms, policy)
    enrol_s = time.monotonic() - t_enrol
    env = {**os.environ, "VIMS_REMOTE_STORE": url}
    procs, infos = [], []
    vids = [f"v{i + 1}" for i in range(n_verifiers)]
    for vid in vids:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "vims.cli", "remote", "serve", "--home", str(folder), "--control",
             f"tcp://127.0.0.1:{free_port()}", "--demo-service", "--metrics-port", "0", "--quiet", "--json",
             "--verifier-id", vid, "--lease-s", str(args.lease), "--write-group", str(group)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    ctx = zmq.asyncio.Context()
    ctx.max_sockets = 4 * n_avms + 1024  # libzmq's default is 1023 sockets a context (EMFILE beyond)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        for proc in procs:
            infos.append(json.loads(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)))  # type: ignore[union-attr]
        endpoints = [i["control"] for i in infos]
        sims = []
        for i, (vm_id, ident) in enumerate(idents.items()):
            k = i % n_verifiers
            sims.append(SimAvm(vm_id, ident, endpoints[k:] + endpoints[:k], vids[k:] + vids[:k], keys.public, ctx,
                               args.failover))
        sim_cpu0 = time.process_time()
        for sim in sims:  # a fleet comes up over a few seconds, not in one burst of CURVE handshakes
            tasks.append(asyncio.create_task(sim.run(args.interval, stop)))
            await asyncio.sleep(args.ramp / len(sims))
        await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in sims)), 180)
        await asyncio.sleep(args.interval + 1.0)  # every A-VM's first reports settle its lease
        start = time.time()
        store = Store(url)
        mark_report = int(store._value("SELECT COALESCE(MAX(id), 0) AS m FROM reports"))
        first_seq = {s.vm_id: s.session.next_seq for s in sims}
        bytes0 = db_bytes(url)
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        attempts: list[Attempt] = []
        clients: list[asyncio.Task[None]] = []
        vms = list(ports)
        t_next = time.monotonic()
        end = t_next + args.seconds
        killed_at: float | None = None
        kill_mark = kill_decision = 0
        rehomed_at: float | None = None
        moved = [s for s in sims if s.verifier_ids[0] == "v1"] if kill else []
        last_check = 0.0
        while time.monotonic() < end:
            now = time.monotonic()
            if kill and killed_at is None and now - (end - args.seconds) >= args.seconds / 3:
                procs[0].send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                kill_mark = int(store._value("SELECT COALESCE(MAX(id), 0) AS m FROM reports"))
                kill_decision = int(store._value("SELECT COALESCE(MAX(id), 0) AS m FROM decisions"))
            if killed_at is not None and rehomed_at is None and now - last_check >= 0.5:
                last_check = now
                n = store._value("SELECT COUNT(DISTINCT avm_id) AS n FROM reports WHERE status = 'accepted' "
                                 "AND verifier_id != 'v1' AND id > ? AND avm_id IN (SELECT avm_id FROM leases "
                                 "WHERE verifier_id != 'v1')", (kill_mark,))
                if int(n) >= len(moved):
                    rehomed_at = time.monotonic()
            vm = random.choice(vms)
            clients.append(asyncio.create_task(attempt(vm, ports[vm], attempts)))
            t_next += 1.0 / args.rate
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))
        wall = time.time() - start
        cpu = [round(100 * (cpu_seconds(p.pid) - c0) / wall, 1) if p.poll() is None else None
               for p, c0 in zip(procs, cpu0, strict=True)]
        sim_cpu = round(100 * (time.process_time() - sim_cpu0) / (wall + 1e-9), 1)
        await asyncio.gather(*clients)
        stop.set()
        await asyncio.gather(*tasks)
        tasks = []
        await asyncio.sleep(1.0)
        bytes1 = db_bytes(url)
        result = measure(store, sims, first_seq, mark_report, attempts, start, killed_at)
        result.update({"avms": n_avms, "verifiers": n_verifiers, "write_group": group, "seconds": args.seconds,
                       "report_interval_s": args.interval, "attempts_per_s": args.rate, "lease_s": args.lease,
                       "enrol_s": round(enrol_s, 1),
                       "cpu_percent_per_verifier": dict(zip(vids, cpu, strict=True)),
                       "simulator_cpu_percent": sim_cpu,
                       "db_bytes_growth_per_hour": round((bytes1 - bytes0) / wall * 3600)})
        if kill:
            result["takeover"] = takeover(store, moved, kill_mark, kill_decision, killed_at, rehomed_at, attempts,
                                          args.lease)
        store.close()
        return result
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        ctx.destroy(linger=0)


def measure(store: Store, sims: list[SimAvm], first_seq: dict[str, int], mark: int, attempts: list[Attempt],
            start: float, killed_at: float | None = None) -> dict[str, Any]:
    """What the store holds of what was sent. A report sent to v1 from a second before it was killed
    on, and not in the store, counts as ``reports_sent_to_killed_verifier``, not as lost."""
    rows = store._rows("SELECT avm_id, vm_id, seq, status, reason, verifier_id FROM reports "
                       "WHERE id > ? AND avm_id IS NOT NULL", (mark,))
    got: dict[tuple[str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        got[(r["avm_id"], r["seq"])].append(r)
    sent = lost = accepted = misattributed = to_killed = 0
    refused: collections.Counter[str] = collections.Counter()
    for s in sims:
        avm_id = s.ident.avm_id
        for seq, (vid, t) in s.sent.items():
            if seq < first_seq[s.vm_id]:
                continue
            sent += 1
            found = got.get((avm_id, seq))
            if not found:
                if killed_at is not None and vid == "v1" and t >= killed_at - 1.0:
                    to_killed += 1
                else:
                    lost += 1
                continue
            ok = [r for r in found if r["status"] == "accepted"]
            if ok:
                accepted += 1
                if ok[0]["vm_id"] != s.vm_id or ok[0]["verifier_id"] != vid or len(ok) > 1:
                    misattributed += 1
            else:
                refused[str(found[0]["reason"])] += 1
    decisions = store._rows("SELECT vm_id, kind, reason, latency_s FROM decisions WHERE time >= ? AND kind IN "
                            "('allow', 'deny')", (start,))
    denied = collections.Counter(d["reason"][:60] for d in decisions if d["kind"] == "deny" and healthy(d["vm_id"]))
    wrong = sum(1 for d in decisions if d["kind"] == "allow" and not healthy(d["vm_id"]))
    lat = [d["latency_s"] for d in decisions if d["latency_s"] is not None]
    outcomes = collections.Counter(a.outcome for a in attempts)

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000, 2)

    return {"reports_sent": sent, "reports_lost": lost, "reports_sent_to_killed_verifier": to_killed,
            "reports_accepted": accepted,
            "reports_refused": dict(refused), "reports_misattributed": misattributed,
            "attempts": len(attempts), "outcomes": dict(outcomes), "decisions": len(decisions),
            "allows_of_failing_vms": wrong, "denials_of_passing_vms": dict(denied.most_common(5)),
            "decision_ms_median": ms(pct(lat, 0.5)),
            "decision_ms_p99": ms(pct(lat, 0.99)), "failovers": sum(s.failovers for s in sims)}


def takeover(store: Store, moved: list[SimAvm], mark: int, mark_decision: int, killed_at: float | None,
             rehomed_at: float | None, attempts: list[Attempt], lease: float) -> dict[str, Any]:
    vms = {s.vm_id for s in moved}
    bad = 0
    for d in store._rows("SELECT vm_id, report_seq FROM decisions WHERE id > ? AND kind = 'allow'", (mark_decision,)):
        if d["vm_id"] not in vms:
            continue
        ok = store._value("SELECT COUNT(*) AS n FROM reports WHERE vm_id = ? AND seq = ? AND status = 'accepted' "
                          "AND verifier_id != 'v1' AND id > ?", (d["vm_id"], d["report_seq"], mark))
        bad += not ok
    assert killed_at is not None
    window = [a for a in attempts if a.vm_id in vms and rehomed_at is not None
              and killed_at <= a.t0 - time.time() + time.monotonic() <= rehomed_at]
    return {"avms_moved": len(moved), "seconds_to_rehome": None if rehomed_at is None else
            round(rehomed_at - killed_at, 2), "lease_s": lease, "two_lease_periods_s": 2 * lease,
            "allows_without_fresh_report": bad,
            "outcomes_while_rehoming": dict(collections.Counter(a.outcome for a in window)),
            "late_cuts": None}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="vims-bench-fleet-"))
    keys = ServerKeys.generate()
    ServerKeys.write(keys, folder)
    results = []
    with TempCluster(fsync=True) as cluster:
        plan = [] if args.only_takeover else [(n, v, False, g) for n in args.avms for v in args.verifiers
                                              for g in args.write_group]
        if not args.no_takeover:
            plan.append((args.avms[0], 2, True, args.write_group[-1]))
        for n, v, kill, g in plan:
            print(f"{n} A-VMs, {v} verifier(s), write group {g}{', v1 killed half-way' if kill else ''}, "
                  f"{args.seconds:g} s ...", file=sys.stderr)
            results.append(await one_run(args, cluster, folder, keys, n, v, kill, g))
            print(json.dumps(results[-1]), file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--avms", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--verifiers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time of each run")
    parser.add_argument("--interval", type=float, default=5.0, help="report interval of each A-VM (s)")
    parser.add_argument("--rate", type=float, default=20.0, help="connection attempts per second")
    parser.add_argument("--lease", type=float, default=10.0, help="the verifiers' lease period (s)")
    parser.add_argument("--failover", type=float, default=5.0,
                        help="silence after a message before an A-VM moves to its next verifier (s)")
    parser.add_argument("--write-group", type=int, nargs="+", default=[64],
                        help="the verifiers' --write-group (accepted reports per transaction); give 1 64 to "
                        "compare one commit per report (the baseline) with group commits in one run")
    parser.add_argument("--no-takeover", action="store_true", help="skip the killed-verifier run")
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds over which the A-VMs start")
    parser.add_argument("--only-takeover", action="store_true", help="only the killed-verifier run (at the "
                        "first --avms); each configuration can also be run on its own this way")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 A-VMs reporting every 2 s, 1 "
                        "and 2 verifiers, 10 s runs, lease 4 s")
    parser.add_argument("--json", action="store_true", help="one JSON object per run on stdout")
    args = parser.parse_args()
    if args.quick:  # the smoke run of `make test`: small and short, the same measurements
        args.avms, args.verifiers, args.seconds = [200], [1, 2], min(args.seconds, 10.0)
        args.interval, args.lease, args.failover, args.ramp = 2.0, 4.0, 2.0, 2.0
    results = asyncio.run(run(args))
    for r in results:
        print(json.dumps(r) if args.json else json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
