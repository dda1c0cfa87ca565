"""The GDB stub client against a real QEMU (no guest OS needed: the firmware alone is a machine)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.required import missing
from vims.collector.gdbstub import GdbError, GdbStub, GuestGoneError, parse_stop_reply
from vims.collector.guest.qemu import free_port
from vims.errors import MissingDependencyError, VimsError


@pytest.fixture()
def bare_qemu() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """QEMU with its firmware only (a few MiB of RAM, TCG) and a GDB stub on a free port."""
    yield from _bare_qemu()


@pytest.fixture()
def bare_qemu_smp2() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The same machine with two vCPUs (multi-threaded TCG, as the Debian guest runs)."""
    yield from _bare_qemu("-smp", "2", "-accel", "tcg,thread=multi")


def _bare_qemu(*extra: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    if shutil.which("qemu-system-x86_64") is None:
        missing("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    port = free_port()
    accel = () if "-accel" in extra else ("-accel", "tcg")
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-m", "32",
         *accel, *extra, "-gdb", f"tcp:127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    try:
        yield proc, port
    finally:
        proc.kill()
        proc.wait()


def test_connecting_leaves_the_vm_running_and_halt_stops_it(bare_qemu: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = bare_qemu
    with GdbStub("127.0.0.1", port) as gdb:
        assert gdb.running
        with pytest.raises(GdbError, match="halt"):
            gdb.registers()
        event = gdb.halt()
        assert event.signal == 2 and event.vcpu == 0
        assert gdb.halt() is event  # already stopped: the same stop
        names = gdb.register_names()
        assert names[24:27] == ["fs_base", "gs_base", "k_gs_base"] and names[29] == "cr3"
        regs = gdb.registers()
        assert {"rip", "rsp", "eflags", "cr0", "cr3", "cr4", "efer"} <= set(regs)
        assert gdb.register("rip") == regs["rip"] and gdb.register("cr0") == regs["cr0"]
        with pytest.raises(VimsError, match="no register 'xyz'"):
            gdb.register("xyz")
        assert gdb.vcpus() == [0]


def test_memory_reads_and_writes(bare_qemu: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = bare_qemu
    with GdbStub("127.0.0.1", port, stop=True) as gdb:
        assert not gdb.running
        # the reset vector at the top of the firmware ROM (no paging yet: linear = physical)
        assert gdb.read(0xFFFFFFF0, 1) == b"\xea"  # a far jump
        data = bytes(range(256)) * 40  # several packets' worth
        gdb.write(0x7000, data)
        assert gdb.read(0x7000, len(data)) == data
        gdb.write(0x7000, bytes(len(data)))


def test_breakpoints_are_tracked_and_removed_on_close(bare_qemu: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = bare_qemu
    gdb = GdbStub("127.0.0.1", port, stop=True)
    gdb.set_breakpoint("hw", 0x1234)
    gdb.set_breakpoint("write", 0x5000, 8)
    assert gdb.breakpoints() == [("hw", 0x1234, 1), ("write", 0x5000, 8)]
    gdb.clear_breakpoint("hw", 0x1234)
    with pytest.raises(VimsError, match="unknown breakpoint kind"):
        gdb.set_breakpoint("bogus", 0)
    gdb.resume()
    assert gdb.wait(0.2) is None  # nothing writes there
    gdb.close()
    # the next client finds the VM running and no watchpoint left behind
    with GdbStub("127.0.0.1", port) as again:
        assert again.running
        again.halt()
        again.set_breakpoint("write", 0x5000, 8)
        again.clear_breakpoint("write", 0x5000, 8)


def test_errors_are_clear(bare_qemu: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, port = bare_qemu
    with pytest.raises(MissingDependencyError, match="no GDB stub listening"):
        GdbStub("127.0.0.1", free_port())
    gdb = GdbStub("127.0.0.1", port, stop=True)
    with pytest.raises(GdbError, match="does not answer: another client"):
        GdbStub("127.0.0.1", port, timeout=1.0)  # QEMU serves one client at a time
    proc.kill()
    proc.wait()
    with pytest.raises(GuestGoneError):
        gdb.read(0, 16)
    gdb.close()  # closing after the guest went away is quiet


def test_two_vcpus_are_listed_and_read_each_for_itself(bare_qemu_smp2: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = bare_qemu_smp2
    with GdbStub("127.0.0.1", port) as gdb:
        gdb.halt()
        assert gdb.vcpus() == [0, 1]
        # alternate between the vCPUs: every read goes to the one asked for (Hg before it)
        first = {v: gdb.registers(v) for v in (1, 0)}
        for v in (0, 1, 0, 1):
            assert gdb.register("rip", v) == first[v]["rip"]
            assert gdb.registers(v, names=("rip", "rsp", "cr0"))["rsp"] == first[v]["rsp"]
        # a breakpoint or watchpoint is one per address, whatever the number of vCPUs
        gdb.set_breakpoint("write", 0x5000, 8)
        assert gdb.breakpoints() == [("write", 0x5000, 8)]
        gdb.clear_breakpoint("write", 0x5000, 8)


def test_stop_replies() -> None:
    assert parse_stop_reply("T05thread:01;awatch:1000;").reason == "awatch"
    assert parse_stop_reply("T05hwbreak:;thread:p1.02;").vcpu == 1
    with pytest.raises(GuestGoneError):
        parse_stop_reply("W00")
    with pytest.raises(GdbError):
        parse_stop_reply("OK")
