"""Memory introspection of the real guest: the process list against the guest's own ``ps``, memory
reads against the GDB stub, the current task of the vCPU, reads in a process's address space."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vims.collector.backends import QemuBackend
from vims.collector.gdbstub import GdbStub
from vims.collector.kernel import KernelView
from vims.collector.memory import PhysicalMemory

WORKLOAD = ("httpd", "vims-agent", "vims-periodic", "vims-webclient", "vims-client")


@pytest.fixture
def view(guest: Any) -> Iterator[KernelView]:
    memory = PhysicalMemory.open(guest.memory_path)
    yield KernelView(memory, guest.profile)
    memory.close()


def ps_names(text: str) -> dict[int, str]:
    """pid -> the name busybox ``ps`` shows: ``{comm} args``, ``[kthread-desc]`` or the program's basename."""
    names = {}
    for line in text.splitlines()[1:]:
        m = re.match(r"\s*(\d+)\s+\S+\s+(.*)$", line)
        if not m:
            continue
        command = m.group(2)
        if command.startswith("{"):
            name = command[1:command.index("}")]
        elif command.startswith("["):
            name = command[1:command.rindex("]")]
        else:
            name = command.split()[0].rsplit("/", 1)[-1]
        names[int(m.group(1))] = name
    return names


def test_process_list_matches_ps(guest: Any, view: KernelView) -> None:
    before = {t.pid: t.comm for t in view.tasks(threads=True)}
    shown = ps_names(guest.run("ps"))
    after = {t.pid: t.comm for t in view.tasks(threads=True)}
    # Processes alive before and after `ps` ran must be in its output, with the same names
    # (busybox adds a work-queue description to kworker names: "kworker/0:0-events").
    steady = {pid: comm for pid, comm in before.items() if after.get(pid) == comm and pid != 0}
    assert len(steady) > 40
    missing = sorted(set(steady) - set(shown))
    assert not missing, f"in the task list but not in ps: {[(p, steady[p]) for p in missing]}"
    for pid, comm in steady.items():
        assert shown[pid] == comm or shown[pid].startswith(comm + "-"), (pid, comm, shown[pid])
    for name in WORKLOAD:
        # Only processes alive before and after `ps`: a child httpd forks meanwhile cannot be in its output.
        pids = [pid for pid, comm in steady.items() if comm == name]
        assert pids, f"workload process {name} not in the task list"
        assert all(shown.get(pid) == name for pid in pids), [(pid, shown.get(pid)) for pid in pids]


def test_processes_have_page_tables_parents_and_executables(view: KernelView) -> None:
    tasks = {t.pid: t for t in view.tasks(exe=True)}
    assert tasks[1].comm == "init" and tasks[1].exe == "/bin/busybox" and tasks[1].ppid == 0
    assert tasks[2].comm == "kthreadd" and tasks[2].cr3 is None and tasks[2].exe is None
    httpd = next(t for t in tasks.values() if t.comm == "httpd")
    assert httpd.ppid == 1 and httpd.cr3 is not None and httpd.cr3 % 4096 == 0
    assert httpd.exe == "/bin/busybox"  # /usr/sbin/httpd is a link to it
    assert len({t.cr3 for t in tasks.values() if t.cr3 is not None}) == sum(
        1 for t in tasks.values() if t.cr3 is not None)  # one address space each


def test_reads_in_a_process_address_space(guest: Any, view: KernelView) -> None:
    """httpd's command line, read from its own pages through its page tables, is /proc/PID/cmdline."""
    httpd = next(t for t in view.tasks() if t.comm == "httpd")
    cmdline = guest.run(f"cat /proc/{httpd.pid}/cmdline")
    mm = httpd.mm
    start = view.u64(mm + view.profile.offset("mm_struct", "arg_start"))
    end = view.u64(mm + view.profile.offset("mm_struct", "arg_end"))
    assert view.read_user(httpd.cr3, start, end - start).decode() == cmdline
    assert view.read_user_string(httpd.cr3, start) == cmdline.split("\0")[0]


def test_guest_uses_5_level_paging_and_memory_equals_the_gdb_stub(guest: Any, view: KernelView) -> None:
    assert view.la57 == (guest.state["cpu"] == "max")
    init = next(t for t in view.tasks() if t.pid == 1)
    stext = view.symbol_address("_stext")
    with GdbStub(*guest.gdb_address) as gdb:
        gdb.halt()
        try:
            regs = gdb.registers()
            assert bool(regs["cr4"] & (1 << 12)) == view.la57  # CR4.LA57
            for vaddr in (stext + 0x1234, init.addr, view.init_task):
                assert gdb.read(vaddr, 256) == view.read(vaddr, 256)
            # the running task: GS base + the per-cpu offset of current_task
            current = view.current_task(kernel_gs(regs))
            task = view.task(current)
            assert current in set(view.task_addresses(threads=True))
            if task.cr3 is not None and regs["rip"] < (1 << 63):
                assert regs["cr3"] & ~0xFFF == task.cr3  # pti=off: one CR3 per process
        finally:
            gdb.resume()


def kernel_gs(regs: dict[str, int]) -> int:
    """The kernel's per-cpu base: GS in kernel mode, the swapped-out KERNEL_GS_BASE in user mode."""
    return regs["gs_base"] if regs["gs_base"] >> 63 else regs["k_gs_base"]


def test_user_code_at_the_stopped_ip_reads_the_same(guest: Any, view: KernelView) -> None:
    compared = 0
    failures: list[BaseException] = []

    def spin() -> None:
        try:
            guest.execute("timeout 3 sh -c 'while :; do :; done'", timeout=30)
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    busy = threading.Thread(target=spin)
    busy.start()  # a user-space loop, so that halts land in user space
    time.sleep(0.5)
    with GdbStub(*guest.gdb_address) as gdb:
        for _ in range(10):
            gdb.halt()
            try:
                regs = gdb.registers()
                task = view.task(view.current_task(kernel_gs(regs)))
                if task.cr3 is not None and regs["rip"] < (1 << 63):
                    assert regs["cr3"] & ~0xFFF == task.cr3  # pti=off: one CR3 per process
                    assert gdb.read(regs["rip"], 16) == view.read_user(task.cr3, regs["rip"], 16)
                    compared += 1
            finally:
                gdb.resume()
            time.sleep(0.05)
    busy.join()
    assert not failures, failures
    assert compared > 0


def test_qemu_backend(guest: Any) -> None:
    with QemuBackend.from_guest(guest) as backend:
        httpd = next(t for t in backend.kernel.tasks() if t.comm == "httpd")
        assert backend.pid_to_dtb(httpd.pid) == httpd.cr3
        assert backend.translate_ksym2v("init_task") == backend.kernel.init_task
        with backend.paused():
            cr3 = backend.get_vcpureg("cr3")
            rip = backend.get_vcpureg("RIP")
            gs_base = backend.get_vcpureg("gs_base")
            assert backend.gdb.running is False
        assert backend.gdb.running is True
        # CR3 is a page-table root in guest RAM (its low bits may hold a PCID); RIP is canonical.
        assert 0 < cr3 & ~0xFFF < backend.memory.end
        assert rip >> 47 in (0, (1 << 17) - 1)
        entry = (backend.translate_ksym2v("__entry_text_start"), backend.translate_ksym2v("__entry_text_end"))
        if rip >> 47 and not entry[0] <= rip < entry[1]:
            # Stopped in the kernel past its entry code: GS base is the kernel's per-cpu area (in user mode,
            # or in the entry code before its swapgs or after the one back, it is the user's).
            assert gs_base >> 63, (hex(gs_base), hex(rip))  # the upper half (4- or 5-level paging)
        assert isinstance(backend.get_vcpureg("gs_base"), int)  # taken while the guest runs: halt, read, resume
        stext = backend.translate_ksym2v("_stext")
        assert backend.read_va(stext, 64) == backend.read_pa(stext - 0xFFFF_FFFF_8000_0000, 64)
