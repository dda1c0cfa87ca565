"""Benchmark: guest RAM read from the QEMU process (``/proc/PID/mem``, how `vims attach` reads a VM it
did not start) against the same RAM mapped from the memory-backend file, in one run on one guest.

    .venv/bin/python benchmarks/bench_attach.py [--name GUEST] [--repeat N] [--json]

Without ``--name`` it boots the busybox guest (its RAM is a file that QEMU maps, so both ways read the
same bytes; the process's mapping of that file is found in ``/proc/PID/maps``). Measured: 8-byte reads
at random places, 4 KiB page reads, the kernel's process list, and every static check. The process
reads cost a system call each: the figure says how much slower they are than a slice of a mapping.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _file_mapping(pid: int, path: str) -> int:
    """Where QEMU process ``pid`` maps the RAM file ``path`` (its lowest address)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5] == path:
            return int(fields[0].split("-")[0], 16)
    raise SystemExit(f"QEMU {pid} does not map {path}")


def _time(fn: Callable[[], Any], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="a running guest started by `vims guest up` (default: boot the busybox one)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each measurement")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one timed run of each")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    repeat = 1 if args.quick else args.repeat

    from vims.collector.backends import QemuBackend
    from vims.collector.checks import Context, registry, run_checks
    from vims.collector.guest import Guest, build_guest
    from vims.collector.memory import PhysicalMemory, ReaderMemory, Region

    own = args.name is None
    guest = Guest.start(build_guest(), name=f"bench-attach-{os.getpid()}") if own else Guest.attach(args.name)
    try:
        mapped = PhysicalMemory.open(guest.memory_path)
        base = _file_mapping(guest.pid, str(Path(guest.memory_path).resolve()))
        regions = [Region(r.paddr, base + r.offset, r.size) for r in mapped.regions]
        process = ReaderMemory.of_process(guest.pid, regions)
        rng = random.Random(0)
        places = [rng.randrange(0, mapped.regions[0].size - 8) for _ in range(20000)]
        pages = [p & ~0xFFF for p in places[:5000]]
        assert mapped.read(0x100000, 4096) == process.read(0x100000, 4096), "the two ways read different bytes"
        rows: dict[str, dict[str, float]] = {}
        for label, memory in (("mapped file", mapped), ("/proc/PID/mem", process)):
            backend = QemuBackend(memory, guest.profile)
            backend.guest = guest
            ctx = Context.of_guest(backend)
            rows[label] = {
                "u64_ns": _time(lambda m=memory: [m.u64(p) for p in places], repeat) / len(places) * 1e9,
                "page_us": _time(lambda m=memory: [m.read(p, 4096) for p in pages], repeat) / len(pages) * 1e6,
                "tasks_ms": _time(lambda b=backend: list(b.kernel.tasks()), repeat) * 1e3,
                "checks_s": _time(lambda c=ctx: run_checks(c, [k() for k in registry().values()]), repeat),
            }
        process.close()
        mapped.close()
    finally:
        if own:
            guest.stop()
    if args.json:
        print(json.dumps({"modes": rows, "slowdown": {k: rows["/proc/PID/mem"][k] / rows["mapped file"][k]
                                                      for k in rows["mapped file"]}}, indent=2))
        return 0
    print(f"{'memory':<16}{'u64 read':>12}{'page read':>12}{'tasks':>10}{'all checks':>12}")
    for label, r in rows.items():
        print(f"{label:<16}{r['u64_ns']:>10.0f}ns{r['page_us']:>10.1f}us{r['tasks_ms']:>8.1f}ms{r['checks_s']:>11.2f}s")
    base_row, proc_row = rows["mapped file"], rows["/proc/PID/mem"]
    print("slowdown of /proc/PID/mem: " + ", ".join(f"{k} {proc_row[k] / base_row[k]:.1f}x" for k in base_row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
