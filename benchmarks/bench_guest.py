"""Benchmark: each guest image's build (cached, and cold with ``--cold``), its boot, its control channel,
the kernel profile's load, and the GDB stub against the mapped RAM file, side by side in one run.

    .venv/bin/python benchmarks/bench_guest.py [--image mini,debian] [--boots N] [--cold] [--json]

The images: ``mini`` (the busybox initramfs: one vCPU, nokaslr, control over a serial line) and
``debian`` (Debian 12 from its packages: 2 vCPUs, KASLR, control over ssh). Baselines in the same run:
1 MiB of kernel text through the GDB stub against the same bytes from the RAM file (KASLR resolved from
memory for the Debian guest); an ssh or serial round trip is the guest's control channel as tests use it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _builder(kind: str) -> Callable[[], Any]:
    from vims.collector.guest import build_guest
    from vims.collector.guest.debian import build_debian

    return {"mini": build_guest, "debian": build_debian}[kind]


def _cold(build: Callable[[], Any]) -> float:
    """A build in an empty temporary cache (downloads, and for mini its first boot)."""
    with tempfile.TemporaryDirectory(prefix="vims-bench-cache-") as tmp:
        old = os.environ.get("VIMS_CACHE")
        os.environ["VIMS_CACHE"] = tmp
        try:
            return _timed(build)[0]
        finally:
            if old is None:
                os.environ.pop("VIMS_CACHE")
            else:
                os.environ["VIMS_CACHE"] = old


def measure(kind: str, boots: int, cold: bool) -> dict[str, Any]:
    """Every figure of one image kind."""
    from vims.collector.gdbstub import GdbStub
    from vims.collector.guest import Guest
    from vims.collector.kernel import KernelView
    from vims.collector.memory import PhysicalMemory
    from vims.collector.profile import KernelProfile

    build = _builder(kind)
    row: dict[str, Any] = {"image": kind}
    if cold:
        row["build_cold_s"] = round(_cold(build), 2)
    build()
    cached, image = _timed(build)
    row["build_cached_s"] = round(cached, 2)
    row["profile_mib"] = image.profile.stat().st_size >> 20
    row["profile_load_s"] = round(_timed(lambda: KernelProfile.load(image.profile))[0], 3)
    times = []
    guest = None
    for i in range(boots):
        if guest is not None:
            guest.stop()
        seconds, guest = _timed(lambda i=i: Guest.start(image, name=f"vims-bench-{kind}-{os.getpid()}-{i}"))
        times.append(seconds)
    assert guest is not None
    row["boot_s"] = round(statistics.median(times), 2)
    row["boots"] = len(times)
    try:
        row["smp"], row["accel"] = guest.state.get("smp", 1), guest.state["accel"]
        row["control_rtt_ms"] = round(statistics.median(_timed(lambda: guest.run("true"))[0]
                                                        for _ in range(5)) * 1000, 1)
        profile = guest.profile  # relocated under KASLR: finding the offsets is part of its cost
        start, size = profile.symbol("_stext"), 1 << 20
        with GdbStub(*guest.gdb_address) as gdb:
            gdb.halt()
            stub, via_stub = _timed(lambda: gdb.read(start, size))
            row["registers_ms"] = round(_timed(gdb.registers)[0] * 1000, 1)
            gdb.resume()
        with PhysicalMemory.open(guest.memory_path) as memory:
            view = KernelView(memory, profile)
            mapped, via_file = _timed(lambda: view.read(start, size))
        if via_stub != via_file:
            raise RuntimeError(f"{kind}: kernel text through the GDB stub differs from the RAM file")
        row["text_1mib_stub_s"], row["text_1mib_file_s"] = round(stub, 3), round(mapped, 5)
        row["file_speedup"] = round(stub / mapped)
        if kind == "debian":
            row["kaslr_virtual_offset"] = guest.status()["kaslr"].get("virtual_offset", "-")
    finally:
        guest.stop()
    return row


LABELS = [
    ("build_cold_s", "build, cold (s)"), ("build_cached_s", "build, cached (s)"),
    ("profile_mib", "profile (MiB JSON)"), ("profile_load_s", "profile load (s)"),
    ("boot_s", "boot to control answer (s)"), ("smp", "vCPUs"), ("control_rtt_ms", "control round trip (ms)"),
    ("text_1mib_stub_s", "1 MiB text via GDB stub (s)"), ("text_1mib_file_s", "1 MiB text via RAM file (s)"),
    ("file_speedup", "RAM file speed-up (x)"), ("registers_ms", "all registers via stub (ms)"),
    ("kaslr_virtual_offset", "KASLR virtual offset"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--image", default="mini,debian", help="comma-separated: mini, debian (default both)")
    parser.add_argument("--boots", type=int, default=2, help="boots to time per image (median)")
    parser.add_argument("--cold", action="store_true", help="also time a cold build in a temporary cache")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one boot each, no cold build")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.boots, args.cold = 1, False
    kinds = [k.strip() for k in args.image.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ("mini", "debian")]
    if unknown or not kinds:
        parser.error(f"--image: unknown image {unknown[0] if unknown else '(none)'!r}; use mini and/or debian")
    rows = [measure(kind, args.boots, args.cold) for kind in kinds]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'':<30}" + "".join(f"{r['image']:>14}" for r in rows))
    for key, label in LABELS:
        if any(key in r for r in rows):
            print(f"{label:<30}" + "".join(f"{r.get(key, '-')!s:>14}" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
