"""Benchmark: the kernel-text check through mapped guest memory against the same read through the GDB
stub, and ``vims check`` on a clean guest with its start-up, in one run on one guest.

    .venv/bin/python benchmarks/bench_checks.py [--name GUEST] [--repeat N]

Without ``--name`` it boots a guest of its own (detached, so that ``vims check`` finds it) and
stops it at the end. Targets: the mapped kernel-text check well under 0.1 s (the stub took about
1.5 s for the 14 MiB), ``vims check`` under 2 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MAPPED_TARGET_S = 0.1
CHECK_TARGET_S = 2.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="a running guest started by `vims guest up` (default: boot one)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each measurement")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one timed run of each")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = 1

    from vims.collector.backends import QemuBackend
    from vims.collector.checks import Context, Reference
    from vims.collector.checks.kernel_text import KernelText
    from vims.collector.gdbstub import GdbStub
    from vims.collector.guest import Guest, GuestImage, build_guest

    own = args.name is None
    if own:
        image = build_guest()
        print("booting a guest ...", file=sys.stderr)
        guest = Guest.start(image, name=f"bench-checks-{os.getpid()}", detach=True)
    else:
        guest = Guest.attach(args.name)
        image = GuestImage.at(Path(guest.state["kernel"]).parent)
    try:
        backend = QemuBackend.from_guest(guest)
        ctx = Context(backend, Reference.from_image(image))
        start, end = ctx.profile.symbol("_stext"), ctx.profile.symbol("_etext")
        size = end - start
        check = KernelText()

        mapped = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            rows = check(ctx)
            mapped.append(time.perf_counter() - t0)
        assert all(r.status == "pass" for r in rows), rows

        with GdbStub(*guest.gdb_address) as gdb:
            gdb.halt()
            try:
                t0 = time.perf_counter()
                via_stub = gdb.read(start, size)
                stub = time.perf_counter() - t0
            finally:
                gdb.resume()
        same = via_stub == bytes(backend.memory.view(ctx.kernel.pa(start), size))
        backend.close()

        command = []
        for _ in range(max(3, args.repeat // 2)):
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "vims.cli", "check", "--name", guest.name, "--json"],
                                  capture_output=True, text=True)
            command.append(time.perf_counter() - t0)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
                return 1
    finally:
        if own:
            guest.stop()

    m, c = statistics.median(mapped), statistics.median(command)
    print(f"kernel text: {size / 2**20:.1f} MiB ({size // 4096} pages)")
    print(f"kernel-text check, mapped memory: median {m * 1e3:7.1f} ms of {len(mapped)} "
          f"(target < {MAPPED_TARGET_S * 1e3:.0f} ms) {'OK' if m < MAPPED_TARGET_S else 'SLOW'}")
    print(f"same bytes through the GDB stub:           {stub * 1e3:7.1f} ms  "
          f"(baseline; mapped is {stub / m:.0f}x faster; identical bytes: {same})")
    print(f"`vims check` (all checks, start-up included): median {c:5.2f} s of {len(command)} "
          f"(target < {CHECK_TARGET_S:.0f} s) {'OK' if c < CHECK_TARGET_S else 'SLOW'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
