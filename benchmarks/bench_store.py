"""Benchmark of REM-S's store operations on SQLite (the baseline) and PostgreSQL, in one run.

The operations the server runs for every report and connection, one after another on one connection,
each write its own committed transaction (as the history writer makes them):

- ``record_report``: an accepted report with a 4 KiB signed document (advances the A-VM's sequence);
- ``record_decision``: a gate decision;
- ``seen_report``: the replay lookup (A-VM, seq, digest) over the stored reports;
- ``policy``: a VM's current policy;
- ``history``: a VM's latest 50 reports and decisions (``vims remote history``);
- ``prune``: one retention pass over everything stored (documents of all but the latest 100 per VM).

Backends: SQLite in WAL mode with ``synchronous=NORMAL`` (the store's settings: a commit is durable
against a crash of REM-S, not of the machine); PostgreSQL 15 in a throwaway cluster
(:class:`vims.remote.pgcluster.TempCluster`, unix socket, default settings: each commit flushed to
disk), and the same with ``synchronous_commit=off`` for the session (durable against a crash of
REM-S or of PostgreSQL, like SQLite's setting; never inconsistent). Figures are operations per
second (``prune``: seconds), medians of nothing: one pass each, on a shared machine.

Usage::

    python benchmarks/bench_store.py            # 5000 reports and decisions over 10 VMs
    python benchmarks/bench_store.py --quick    # 300
    python benchmarks/bench_store.py --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

from vims.errors import MissingDependencyError
from vims.remote.keys import AvmIdentity
from vims.remote.pgcluster import TempCluster
from vims.remote.store import Store

VMS = 10
DOCUMENT = json.dumps({"pad": "x" * 4000})
OPS = ("record_report", "record_decision", "seen_report", "policy", "history")


def _rate(n: int, fn: Callable[[int], Any]) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def measure(store: Store, n: int) -> dict[str, float]:
    """Operations per second of each operation, ``n`` times each, and one prune's seconds."""
    for v in range(VMS):
        store.enroll(AvmIdentity.generate(f"avm-{v}").public, f"vm-{v}", 42000 + v, {"history_documents": 100})
    out = {
        "record_report": _rate(n, lambda i: store.record_report(
            avm_id=f"avm-{i % VMS}", vm_id=f"vm-{i % VMS}", seq=i + 1, status="accepted", nonce=f"{i:032x}",
            score=0.9, verdict="allow", detail="passes", digest=f"{i:064x}", document=DOCUMENT)),
        "record_decision": _rate(n, lambda i: store.record_decision(
            vm_id=f"vm-{i % VMS}", conn_id=f"vm-{i % VMS}#{i}", kind="allow", reason="passes",
            peer="127.0.0.1:40000", latency_s=0.004, report_seq=i + 1)),
        "seen_report": _rate(n, lambda i: store.seen_report(f"avm-{i % VMS}", i + 1, f"{i:064x}")),
        "policy": _rate(n, lambda i: store.policy(f"vm-{i % VMS}")),
        "history": _rate(max(1, n // 10), lambda i: store.history(f"vm-{i % VMS}", 50)),
    }
    t0 = time.perf_counter()
    store.prune({f"vm-{v}": (30.0, 100) for v in range(VMS)}, max_unattributed=10000)
    out["prune_s"] = time.perf_counter() - t0
    return out


@contextlib.contextmanager
def backends(folder: Path) -> Iterator[list[tuple[str, str | Path | None, str]]]:
    """(name, location or None, note) for each backend; PostgreSQL's cluster lives for the block."""
    rows: list[tuple[str, str | Path | None, str]] = [("sqlite", folder / "bench.sqlite", "WAL, synchronous=NORMAL")]
    try:
        cluster = TempCluster(fsync=True)
    except MissingDependencyError as exc:
        rows += [("postgresql", None, str(exc))]
        yield rows
        return
    with cluster:
        with psycopg.connect(cluster.url(), autocommit=True) as admin:
            for db in ("bench_sync", "bench_async"):
                admin.execute(f"CREATE DATABASE {db}")
        rows += [("postgresql", cluster.url("bench_sync"), "synchronous_commit=on (default)"),
                 ("postgresql", cluster.url("bench_async") + "&options=-csynchronous_commit%3Doff",
                  "synchronous_commit=off")]
        yield rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 operations of each kind instead of 5000")
    parser.add_argument("--json", action="store_true", help="print one JSON object per backend")
    args = parser.parse_args(argv)
    n = 300 if args.quick else 5000
    results = []
    with tempfile.TemporaryDirectory() as tmp, backends(Path(tmp)) as todo:
        for name, location, note in todo:
            if location is None:
                results.append({"backend": name, "note": f"not measured: {note}"})
                continue
            with contextlib.closing(Store(location)) as store:
                results.append({"backend": name, "note": note, "n": n, **measure(store, n)})
    if args.json:
        for r in results:
            print(json.dumps(r))
        return 0
    base = results[0]
    print(f"store operations per second ({n} of each, one connection, each write committed; history: {n // 10})")
    print(f"{'backend':<11} {'setting':<32}" + "".join(f"{op:>16}" for op in OPS) + f"{'prune s':>10}")
    for r in results:
        if "n" not in r:
            print(f"{r['backend']:<11} {r['note']}")
            continue
        cells = "".join(f"{r[op]:>9.0f} {r[op] / base[op]:>5.2f}x" for op in OPS)
        print(f"{r['backend']:<11} {r['note']:<32}{cells}{r['prune_s']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
