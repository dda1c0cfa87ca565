"""The QEMU TCG plugin tracer on the real busybox guest (under QEMU 10 with ``vims_syscall`` loaded):
a known program's calls with the right identity, every execve of a workload, agreement with the
watchpoint tracer on the same workload, and a ring made small on purpose dropping and counting.

Skipped, saying why, when the plugin is not built (``bash scripts/qemu-plugin-setup.sh``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vims.collector.backends import QemuBackend
from vims.collector.guest import Guest, GuestImage
from vims.collector.plugin import find_plugin
from vims.collector.plugin_tracer import PluginTracer
from vims.collector.recorder import TraceResult
from vims.collector.tracer import SyscallTracer
from vims.errors import MissingDependencyError
from vims.schemas import EVENT_SCHEMA
from vims.tracing_policy import Policy

READ, WRITE, EXECVE = 0, 1, 59


def _plugin_guest(image: GuestImage, slots: int) -> Guest:
    try:
        find_plugin()
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    return Guest.start(image, name=f"vims-plugin-{slots}-{os.getpid()}", plugin=True, plugin_slots=slots)


@pytest.fixture(scope="module")
def pguest(guest_image: GuestImage) -> Iterator[Guest]:
    running = _plugin_guest(guest_image, 65536)
    try:
        yield running
    finally:
        running.stop()


def trace(guest: Guest, seconds: float, during: Callable[[], Any], tracer_cls: Any = PluginTracer,
          **options: Any) -> TraceResult:
    """Trace ``guest`` for ``seconds`` while ``during`` runs in it (started half a second in)."""
    failures: list[BaseException] = []

    def play() -> None:
        time.sleep(0.5)
        try:
            during()
        except BaseException as exc:
            failures.append(exc)

    with QemuBackend.from_guest(guest) as backend:
        tracer = tracer_cls(backend, "test-vm", **options)
        player = threading.Thread(target=play)
        player.start()
        result = tracer.run(duration=seconds)
        player.join()
    if failures:
        raise failures[0]
    return result


def test_known_program_all_calls_right_identity(pguest: Guest) -> None:
    n = 3000
    out: dict[str, str] = {}

    def dd() -> None:  # the shell prints its pid, then becomes dd: the same pid
        out["text"] = pguest.run(f"sh -c 'echo pid=$$; exec dd if=/dev/zero of=/dev/null bs=1 count={n}' 2>&1")

    result = trace(pguest, 6.0, dd)
    pid = int(out["text"].split("pid=", 1)[1].split()[0])
    events = result.events
    assert events.schema == EVENT_SCHEMA and result.method == "plugin"
    rows = [r for r in events.to_pylist() if r["pid"] == pid]
    reads = [r for r in rows if r["nr"] == READ and r["args"][2] == 1 and r["comm"] == "dd"]
    writes = [r for r in rows if r["nr"] == WRITE and r["args"][2] == 1 and r["comm"] == "dd"]
    assert len(reads) >= n and len(writes) >= n, (len(reads), len(writes))
    assert all(r["tgid"] == pid and r["vcpu"] == 0 and r["cr3"] for r in reads)
    # its execve is there, made by the shell (comm read at the call, before the exec renamed it)
    execs = [r for r in rows if r["nr"] == EXECVE]
    assert execs and execs[0]["comm"] == "sh"
    stats = result.stats
    assert stats["dropped"] == 0 and stats["seen"] == stats["events"] + stats["unreadable"]
    assert stats["delivered_share"] > 0.99


def test_every_execve_appears(pguest: Guest) -> None:
    k = 8

    def workload() -> None:
        pguest.run(f"i=0; while [ $i -lt {k} ]; do /bin/cat /proc/version >/dev/null; i=$((i+1)); done")

    result = trace(pguest, 5.0, workload)
    rows = result.events.to_pylist()
    # each exec with its path and command line, read by the plugin at the call (after a successful
    # exec the memory they were in is gone), made by the shell's child (comm read at the call)
    runs = [r for r in rows if r["nr"] == EXECVE and r["argv"] == "/bin/cat /proc/version"]
    assert len(runs) == k, [(r["path"], r["argv"], r["comm"]) for r in rows if r["nr"] == EXECVE]
    assert all(r["path"] == "/bin/cat" and r["comm"] == "sh" for r in runs)
    # ... and each of those processes then ran as cat
    cats = {r["pid"] for r in rows if r["comm"] == "cat"}
    assert {r["pid"] for r in runs} <= cats


def test_the_parent_is_read_at_the_call(pguest: Guest) -> None:
    """A background subshell outlives the shell that started it: its calls name that shell as their
    parent while it runs and init once the kernel has handed the orphan over, as the plugin read
    ``real_parent`` at each call (a parent read once and cached, or read after the task had exited,
    names a task that is not the caller's parent then)."""
    out: dict[str, str] = {}

    def orphan() -> None:
        out["text"] = pguest.run("sh -c 'echo pid=$$; (sleep 1; cat /proc/version) >/dev/null 2>&1 & "
                                 "echo child=$!; sleep 0.3'")

    result = trace(pguest, 5.0, orphan)
    parent = int(out["text"].split("pid=", 1)[1].split()[0])
    child = int(out["text"].split("child=", 1)[1].split()[0])
    rows = result.events.to_pylist()
    exits = [r["ts_ns"] for r in rows if r["pid"] == parent and r["nr"] in (60, 231)]
    assert exits, "the shell's exit was not traced"
    mine = [r for r in rows if r["pid"] == child]
    before = {r["ppid"] for r in mine if r["ts_ns"] < exits[0]}
    after = {r["ppid"] for r in mine if r["ts_ns"] > exits[0]}
    assert before == {parent} and after == {1}, (parent, before, after)


def test_agrees_with_watchpoint_tracer(pguest: Guest) -> None:
    """The same workload under both tracers: the same programs, call numbers and identities."""

    def workload() -> None:
        pguest.run("for i in 1 2 3; do cat /proc/uptime >/dev/null; ls / >/dev/null; done")

    def summary(result: TraceResult) -> tuple[set[str], set[tuple[str, int]], bool]:
        rows = [r for r in result.events.to_pylist() if r["comm"] in ("cat", "ls")]
        ids = all(r["pid"] == r["tgid"] and r["ppid"] > 0 for r in rows)
        return {r["comm"] for r in rows}, {(r["comm"], r["nr"]) for r in rows}, ids

    plugin = summary(trace(pguest, 5.0, workload))
    watch = summary(trace(pguest, 12.0, workload, SyscallTracer, method="watchpoint"))
    assert plugin[0] == watch[0] == {"cat", "ls"}
    assert plugin[1] == watch[1], plugin[1] ^ watch[1]
    assert plugin[2] and watch[2]


def test_program_filter_is_applied_in_the_plugin_and_changes_live(pguest: Guest) -> None:
    """The policy's program filter is written into the plugin's control area: an excluded program's calls
    take no ring slot (counted as filtered by the plugin); a new policy given mid-trace applies from then
    on, with QEMU untouched."""
    n = 1500
    with QemuBackend.from_guest(pguest) as backend:
        tracer = PluginTracer(backend, "test-vm", policy=Policy(exclude=("d?",)))
        failures: list[BaseException] = []

        def play() -> None:
            try:
                time.sleep(0.5)
                pguest.run(f"dd if=/dev/zero of=/dev/null bs=1 count={n}")  # excluded, in the plugin
                tracer.set_policy(Policy(include=("dd",)))
                time.sleep(1.0)  # the loop takes the new policy at its next turn (every few ms)
                pguest.run(f"dd if=/dev/zero of=/dev/null bs=1 count={n + 7}")  # now the only one kept
            except BaseException as exc:
                failures.append(exc)

        player = threading.Thread(target=play)
        player.start()
        result = tracer.run(duration=8.0)
        player.join()
    assert not failures, failures
    rows = result.events.to_pylist()
    reads = [r for r in rows if r["comm"] == "dd" and r["nr"] == READ and r["args"][2] == 1]
    assert n + 7 <= len(reads) < 2 * n, len(reads)  # the second dd's reads, none of the first's
    assert result.stats["plugin_filtered"] >= 2 * n, result.stats  # the first dd's reads and writes
    after = min(r["ts_ns"] for r in reads)
    assert {r["comm"] for r in rows if r["ts_ns"] >= after} == {"dd"}
    assert "sh" in {r["comm"] for r in rows if r["ts_ns"] < after}  # everything but dd before the change


def test_call_filter_is_applied_in_the_plugin_and_changes_live(pguest: Guest) -> None:
    """The policy's call filter is a bitmap in the plugin's control area: an excluded call takes no ring
    slot (counted as filtered by the plugin, before it reads the caller); a new policy given mid-trace
    keeps only the calls it names from then on."""
    n = 1200
    with QemuBackend.from_guest(pguest) as backend:
        tracer = PluginTracer(backend, "test-vm", policy=Policy(exclude_calls=("read",)))
        failures: list[BaseException] = []

        def play() -> None:
            try:
                time.sleep(0.5)
                pguest.run(f"dd if=/dev/zero of=/dev/null bs=1 count={n}")  # its reads excluded, in the plugin
                tracer.set_policy(Policy(include_calls=("read", "execve")))
                time.sleep(1.0)  # the loop takes the new policy at its next turn (every few ms)
                # now only reads, and the exec of cat (the shell runs dd as an applet, without one)
                pguest.run(f"/bin/cat /proc/version >/dev/null; dd if=/dev/zero of=/dev/null bs=1 count={n + 5}")
            except BaseException as exc:
                failures.append(exc)

        player = threading.Thread(target=play)
        player.start()
        result = tracer.run(duration=8.0)
        player.join()
    assert not failures, failures
    rows = result.events.to_pylist()
    dd = [r for r in rows if r["comm"] == "dd" and r["args"][2] == 1]
    writes = [r for r in dd if r["nr"] == WRITE]
    reads = [r for r in dd if r["nr"] == READ]
    assert n <= len(writes) < n + 5, len(writes)  # the first dd's writes only
    assert n + 5 <= len(reads) < 2 * n, len(reads)  # the second dd's reads only
    assert result.stats["plugin_filtered"] >= 2 * n, result.stats  # first dd's reads, second's writes
    after = min(r["ts_ns"] for r in reads)
    assert {r["nr"] for r in rows if r["ts_ns"] >= after} <= {READ, EXECVE}
    assert any(r["nr"] == EXECVE and r["argv"] == "/bin/cat /proc/version" for r in rows)  # kept by both


def test_tiny_ring_drops_and_counts(guest_image: GuestImage) -> None:
    """With 8 slots and a collector that does not read, the ring fills: drops counted, the guest goes on."""
    small = _plugin_guest(guest_image, 8)
    try:
        with QemuBackend.from_guest(small) as backend:
            tracer = PluginTracer(backend, "test-vm")
            rings = tracer.rings
            # the collector stalls: the plugin is on, nobody takes the records
            rings.control(enabled=True, task_offset=backend.kernel.current_task_offset)
            before = rings.counter(0, "dropped")
            # a vCPU waiting on the full ring would never finish this (run() times out and raises)
            small.run("dd if=/dev/zero of=/dev/null bs=1 count=2000")
            dropped = rings.counter(0, "dropped") - before
            assert rings.counter(0, "head") - rings.counter(0, "tail") == 8  # full
            assert dropped >= 4000 - 8
            rings.control(enabled=False)
            result = tracer.run(duration=1.0)  # takes what is left: drops since its start are counted
            assert result.stats["dropped"] == sum(result.stats["dropped_per_vcpu"])
            tracer.close()
    finally:
        small.stop()
