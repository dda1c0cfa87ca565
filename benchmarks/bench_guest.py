"""Benchmark: the guest's build (cached, and cold with ``--cold``), its boot, its control channel, the
kernel profile's load, and the GDB stub against the mapped RAM file, in one run.

    .venv/bin/python benchmarks/bench_guest.py [--boots N] [--cold]

Baselines in the same run: a control-channel round trip against a bare TCP round trip to QEMU's
monitor-free GDB stub; 1 MiB of kernel text through the stub against the same bytes from the RAM file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def _timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=2, help="boots to time (TCG: about 8 s each)")
    parser.add_argument("--cold", action="store_true", help="also time a cold build in a temporary cache")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one boot, no cold build")
    args = parser.parse_args(argv)
    if args.quick:
        args.boots, args.cold = 1, False

    from vims.collector.gdbstub import GdbStub
    from vims.collector.guest import Guest, build_guest
    from vims.collector.guest.qemu import KERNEL_MAP_BASE
    from vims.collector.profile import KernelProfile

    if args.cold:
        with tempfile.TemporaryDirectory(prefix="vims-bench-cache-") as tmp:
            old = os.environ.get("VIMS_CACHE")
            os.environ["VIMS_CACHE"] = tmp
            try:
                cold, _ = _timed(build_guest)
            finally:
                if old is None:
                    os.environ.pop("VIMS_CACHE")
                else:
                    os.environ["VIMS_CACHE"] = old
        print(f"build (cold, download + first boot): {cold:8.2f} s")
    build_guest()
    cached, image = _timed(build_guest)
    print(f"build (cached):                      {cached:8.2f} s")

    load, profile = _timed(lambda: KernelProfile.load(image.profile))
    print(f"profile load ({image.profile.stat().st_size >> 20} MiB JSON):         {load:8.3f} s")

    boots = []
    for i in range(args.boots):
        seconds, guest = _timed(lambda i=i: Guest.start(image, name=f"vims-bench-{os.getpid()}-{i}"))
        boots.append(seconds)
        if i < args.boots - 1:
            guest.stop()
    print(f"boot to control-agent answer:        {statistics.median(boots):8.2f} s (median of {len(boots)})")
    try:
        rtt = [_timed(lambda: guest.run("true"))[0] for _ in range(5)]
        print(f"control channel round trip:          {statistics.median(rtt) * 1000:8.1f} ms")
        start = profile.symbol("_stext")
        size = 1 << 20
        with GdbStub(*guest.gdb_address) as gdb:
            gdb.halt()
            stub, via_stub = _timed(lambda: gdb.read(start, size))
            regs = _timed(gdb.registers)[0]
            gdb.resume()
        with open(guest.memory_path, "rb") as mem:
            mem.seek(start - KERNEL_MAP_BASE)
            mapped, via_file = _timed(lambda: mem.read(size))
        assert via_stub == via_file
        print(f"1 MiB kernel text via GDB stub:      {stub:8.3f} s")
        print(f"1 MiB kernel text via RAM file:      {mapped:8.5f} s  ({stub / mapped:.0f}x faster)")
        print(f"all registers via GDB stub:          {regs * 1000:8.1f} ms")
    finally:
        guest.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
