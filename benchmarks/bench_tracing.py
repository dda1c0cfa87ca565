"""Benchmark: system-call tracing of a busy guest, in one run on one guest: events/s captured and the
guest's slowdown for no tracing, the breakpoint method, the watchpoint method and a 10% duty cycle.

    .venv/bin/python benchmarks/bench_tracing.py [--name GUEST] [--seconds S] [--json]

The guest runs a shell loop that counts its iterations into a file (each iteration is a handful of
system calls: open, write, close, ...). Its work rate is measured from the host: the counter is
read through the control channel before and after each traced interval, and divided by the host
time between the two reads. The slowdown of a mode is the untraced rate (measured before and after
the traced modes, averaged) over the mode's rate.

Without ``--name`` it boots a guest of its own and stops it at the end. Targets under TCG: at least
800 events/s with the watchpoint on this busy guest, and at most 1.3x slowdown at a 10% duty cycle.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

WATCH_TARGET = 800.0
DUTY_SLOWDOWN_TARGET = 1.3
LOOP = "i=0; while :; do i=$((i+1)); echo $i > /tmp/bench.count; done"


def _count(guest: Any) -> tuple[int, float]:
    """The guest loop's counter and the host time it was read at (the middle of the round trip)."""
    for _ in range(20):
        t0 = time.monotonic()
        text = guest.run("cat /tmp/bench.count").strip()
        t1 = time.monotonic()
        if text.isdigit():
            return int(text), (t0 + t1) / 2
        time.sleep(0.05)  # read between the truncation and the write of an iteration: read again
    raise RuntimeError("the guest's counting loop does not write its counter")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--name", help="a running guest started by `vims guest up` (default: boot one)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each measured interval")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1.5 s per mode, targets not enforced")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 1.5

    from vims.collector.backends import QemuBackend
    from vims.collector.guest import Guest, GuestImage, build_guest
    from vims.collector.tracer import SyscallTracer
    from vims.tracing_policy import Policy

    own = args.name is None
    if own:
        image: GuestImage = build_guest()
        print("booting a guest ...", file=sys.stderr)
        guest = Guest.start(image, name=f"bench-tracing-{os.getpid()}")
    else:
        guest = Guest.attach(args.name)
    backend = QemuBackend.from_guest(guest)
    rows: list[dict[str, Any]] = []
    try:
        loop_pid = guest.run(f"sh -c '{LOOP}' </dev/null >/dev/null 2>&1 & echo $!").strip()
        time.sleep(1.0)

        def measure(mode: str, options: dict[str, Any] | None) -> dict[str, Any]:
            c0, t0 = _count(guest)
            result = None
            if options is None:
                time.sleep(args.seconds)
            else:
                result = SyscallTracer(backend, "bench", **options).run(duration=args.seconds)
            c1, t1 = _count(guest)
            row = {"mode": mode, "iterations_per_s": round((c1 - c0) / (t1 - t0), 1), "seconds": round(t1 - t0, 2)}
            if result is not None:
                row.update(events=result.stats["events"], events_per_s=result.stats["events_per_s"],
                           armed_fraction=result.stats["armed_fraction"], reason=result.reason)
            print(f"  {mode}: {row}", file=sys.stderr)
            return row

        duty = Policy(mode="duty-cycle", window_ms=100, period_ms=1000)
        plan: list[tuple[str, dict[str, Any] | None]] = [
            ("none", None),
            ("breakpoint", {"method": "breakpoint"}),
            ("watchpoint", {"method": "watchpoint"}),
            ("duty-10%", {"method": "watchpoint", "policy": duty}),
            ("none-again", None),
        ]
        rows = [measure(mode, options) for mode, options in plan]
        guest.run(f"kill {loop_pid}")
    finally:
        backend.close()
        if own:
            guest.stop()

    base = (rows[0]["iterations_per_s"] + rows[-1]["iterations_per_s"]) / 2
    for row in rows:
        row["slowdown"] = round(base / row["iterations_per_s"], 2) if row["iterations_per_s"] else float("inf")
    by = {r["mode"]: r for r in rows}
    checks = {
        "watchpoint_events_per_s": {"value": by["watchpoint"]["events_per_s"], "target": f">= {WATCH_TARGET:g}",
                                    "ok": by["watchpoint"]["events_per_s"] >= WATCH_TARGET},
        "duty_10_slowdown": {"value": by["duty-10%"]["slowdown"], "target": f"<= {DUTY_SLOWDOWN_TARGET:g}",
                             "ok": by["duty-10%"]["slowdown"] <= DUTY_SLOWDOWN_TARGET},
    }
    report = {"seconds": args.seconds, "baseline_iterations_per_s": round(base, 1), "modes": rows,
              "targets": checks, "guest": guest.status()["accel"], "load": os.getloadavg()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"guest work rate untraced: {base:,.0f} iterations/s (accel {report['guest']}, "
              f"host load {report['load'][0]:.1f})")
        print(f"{'mode':<12} {'events/s':>9} {'iter/s':>9} {'slowdown':>9}")
        for r in rows:
            print(f"{r['mode']:<12} {r.get('events_per_s', 0):>9,.0f} {r['iterations_per_s']:>9,.0f} "
                  f"{r['slowdown']:>8.2f}x")
        for name, c in checks.items():
            print(f"{name}: {c['value']} (target {c['target']}): {'PASS' if c['ok'] else 'FAIL'}")
    return 0 if args.quick or all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
