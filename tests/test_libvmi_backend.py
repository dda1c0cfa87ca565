"""The LibVMI backend against the fake ``libvmi`` package (tests/fakes/libvmi), over a small synthetic
Linux memory image built here: kernel page tables, a task list, a process with its own page tables.

The same image read through plain mapped memory gives the same answers: the kernel readers do not
depend on the backend.
"""

from __future__ import annotations

import importlib
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vims.collector.kernel import KernelView
from vims.collector.memory import START_KERNEL_MAP, PhysicalMemory
from vims.collector.profile import KernelProfile, make_profile
from vims.errors import MissingDependencyError

FAKES = Path(__file__).with_name("fakes")
MiB = 1 << 20
POB = 0xFFFF_8880_0000_0000  # page_offset_base (4-level, nokaslr)
P, RW, PS = 0x1, 0x2, 0x80

# task_struct, mm_struct, ... offsets of the synthetic kernel
TASK = {"tasks": 0x10, "pid": 0x20, "tgid": 0x24, "comm": 0x28, "real_parent": 0x38, "mm": 0x40,
        "signal": 0x48, "thread_node": 0x50, "pid_links": 0x60}
MM = {"pgd": 0x08, "exe_file": 0x10, "start_code": 0x18, "end_code": 0x20}


def va(pa: int) -> int:
    """The kernel virtual address of ``pa``: the kernel image below 2 MiB in this toy, else the direct map."""
    return START_KERNEL_MAP + pa if 0x10_0000 <= pa < 0x20_0000 else POB + pa


def _struct(size: int, fields: dict[str, int]) -> dict[str, Any]:
    return {"kind": "struct", "size": size,
            "fields": {k: {"offset": v, "type": {"kind": "base", "name": "long"}} for k, v in fields.items()}}


class Image:
    """A toy Linux guest's physical memory."""

    def __init__(self) -> None:
        self.ram = bytearray(8 * MiB)
        self.next_table = 5 * MiB
        self.symbols: dict[str, int] = {}
        self.kernel_dtb = self.table()
        # Kernel page tables: the direct map and the kernel image, both with 2 MiB pages over all RAM.
        for pa in range(0, len(self.ram), 2 * MiB):
            self.map(self.kernel_dtb, POB + pa, pa, 2 * MiB)
            self.map(self.kernel_dtb, START_KERNEL_MAP + pa, pa, 2 * MiB)
        self.sym("page_offset_base", 0x10_0000)
        self.u64(0x10_0000, POB)
        self.symbols["init_top_pgt"] = START_KERNEL_MAP + self.kernel_dtb
        self.symbols["_end"] = START_KERNEL_MAP + 4 * MiB
        self.symbols["current_task"] = 0x1000  # per-cpu offset
        self.symbols["__x64_sys_openat"] = START_KERNEL_MAP + 0x18_0000

    # -- raw memory --------------------------------------------------------------------------------
    def u64(self, pa: int, value: int) -> None:
        struct.pack_into("<Q", self.ram, pa, value)

    def u32(self, pa: int, value: int) -> None:
        struct.pack_into("<I", self.ram, pa, value)

    def sym(self, name: str, pa: int) -> int:
        self.symbols[name] = START_KERNEL_MAP + pa
        return pa

    def table(self) -> int:
        pa = self.next_table
        self.next_table += 0x1000
        return pa

    def map(self, root: int, vaddr: int, paddr: int, page: int = 0x1000) -> None:
        leaf = {0x1000: 0, 2 * MiB: 1}[page]
        table = root
        for level in range(3, leaf, -1):
            index = (vaddr >> (12 + 9 * level)) & 0x1FF
            entry = struct.unpack_from("<Q", self.ram, table + 8 * index)[0]
            if not entry & P:
                entry = self.table() | P | RW
                self.u64(table + 8 * index, entry)
            table = entry & 0x000F_FFFF_FFFF_F000
        index = (vaddr >> (12 + 9 * leaf)) & 0x1FF
        self.u64(table + 8 * index, paddr | P | RW | (PS if leaf else 0))

    # -- kernel objects --------------------------------------------------------------------------
    def task(self, pa: int, pid: int, tgid: int, comm: str, parent_pa: int, mm_pa: int = 0,
             signal_pa: int = 0) -> int:
        self.u32(pa + TASK["pid"], pid)
        self.u32(pa + TASK["tgid"], tgid)
        self.ram[pa + TASK["comm"]:pa + TASK["comm"] + 16] = comm.encode().ljust(16, b"\0")
        self.u64(pa + TASK["real_parent"], va(parent_pa))
        self.u64(pa + TASK["mm"], POB + mm_pa if mm_pa else 0)
        self.u64(pa + TASK["signal"], POB + signal_pa if signal_pa else 0)
        return pa

    def link(self, head: int, nodes: list[int]) -> None:
        """A circular list_head list through ``head`` and ``nodes`` (physical addresses of list_heads)."""
        ring = [head, *nodes]
        for i, node in enumerate(ring):
            self.u64(node, va(ring[(i + 1) % len(ring)]))
            self.u64(node + 8, va(ring[i - 1]))

    def dentry(self, pa: int, name: str, parent_pa: int) -> int:
        self.ram[pa + 0x80:pa + 0x80 + len(name) + 1] = name.encode() + b"\0"
        self.u64(pa + 0x18, POB + parent_pa)  # d_parent
        self.u64(pa + 0x20 + 8, POB + pa + 0x80)  # d_name.name
        return pa


def build() -> tuple[Image, KernelProfile]:
    img = Image()
    init_task = img.sym("init_task", 0x10_2000)
    img.task(init_task, 0, 0, "swapper/0", init_task)
    # /bin/busybox: dentries root <- bin <- busybox, and a struct file pointing at it
    root = img.dentry(0x30_0000, "/", 0x30_0000)
    bindir = img.dentry(0x30_1000, "bin", root)
    exe = img.dentry(0x30_2000, "busybox", bindir)
    file = 0x30_3000
    img.u64(file + 0x10 + 8, POB + exe)  # f_path.dentry
    # the user process's page tables: its code page and a string page
    user_pgd = img.table()
    # the kernel half is shared by every address space (pti=off), as Linux copies it into each pgd
    img.ram[user_pgd + 2048:user_pgd + 4096] = img.ram[img.kernel_dtb + 2048:img.kernel_dtb + 4096]
    img.map(user_pgd, 0x40_0000, 0x70_0000)
    img.map(user_pgd, 0x7FFF_F000_0000, 0x71_0000)
    img.ram[0x71_0FF8:0x71_1000] = b"/etc/sha"  # crosses into an unmapped page: ends there
    img.map(user_pgd, 0x7FFF_F000_1000, 0x72_0000)
    img.ram[0x72_0000:0x72_0004] = b"dow\0"
    mm = 0x38_0000
    img.u64(mm + MM["pgd"], POB + user_pgd)
    img.u64(mm + MM["exe_file"], POB + file)
    img.u64(mm + MM["start_code"], 0x40_1000)
    img.u64(mm + MM["end_code"], 0x40_2000)
    signal = 0x39_0000
    init = img.task(0x20_0000, 1, 1, "init", init_task, mm, signal)
    kthreadd = img.task(0x20_1000, 2, 2, "kthreadd", init_task)
    httpd = img.task(0x20_2000, 42, 42, "httpd", init, mm, signal + 0x100)
    worker = img.task(0x20_3000, 43, 42, "httpd-worker", init, mm, signal + 0x100)
    img.link(init_task + TASK["tasks"], [t + TASK["tasks"] for t in (init, kthreadd, httpd)])
    img.link(signal, [init + TASK["thread_node"]])
    img.link(signal + 0x100, [httpd + TASK["thread_node"], worker + TASK["thread_node"]])
    # vCPU 0 runs httpd: its per-cpu area holds current_task
    percpu = 0x3A_0000
    img.u64(percpu + img.symbols["current_task"], POB + httpd)
    img.sym("__per_cpu_offset", 0x10_3000)
    img.u64(0x10_3000, POB + percpu)
    types = {
        "task_struct": _struct(0x400, TASK),
        "mm_struct": _struct(0x100, MM),
        "signal_struct": _struct(0x100, {"thread_head": 0}),
        "file": _struct(0x100, {"f_path": 0x10}),
        "path": _struct(0x10, {"mnt": 0, "dentry": 8}),
        "dentry": _struct(0x100, {"d_parent": 0x18, "d_name": 0x20}),
        "qstr": _struct(0x10, {"hash_len": 0, "name": 8}),
    }
    symbols = {name: {"address": addr, "type": "D"} for name, addr in img.symbols.items()}
    profile = KernelProfile.from_dict(make_profile(symbols, {"user_types": types}, {"release": "6.1.0-toy"}))
    return img, profile


@pytest.fixture
def libvmi(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The fake ``libvmi`` package, imported as ``libvmi``, with a domain ``toy`` holding the image."""
    monkeypatch.syspath_prepend(str(FAKES))
    for name in [m for m in sys.modules if m == "libvmi" or m.startswith("libvmi.")]:
        monkeypatch.delitem(sys.modules, name)
    lib = importlib.import_module("libvmi")
    assert Path(lib.__file__).is_relative_to(FAKES)
    from libvmi._fake import FakeDomain

    img, profile = build()
    dom = FakeDomain("toy", img.ram, kernel_dtb=img.kernel_dtb, symbols=dict(img.symbols),
                     pids={1: 0, 42: 0}, vcpus=2)
    dom.pids = {1: _user_pgd(img), 42: _user_pgd(img)}
    dom.registers[0].update(cr3=dom.pids[42], gs_base=POB + 0x3A_0000, rip=START_KERNEL_MAP + 0x18_0000)
    lib.test_image = (img, profile, dom)
    yield lib
    dom.close()


def _user_pgd(img: Image) -> int:
    return struct.unpack_from("<Q", img.ram, 0x38_0000 + MM["pgd"])[0] - POB


def test_the_backend_lists_tasks_and_reads_through_libvmi(libvmi: Any) -> None:
    from vims.collector.backends import LibvmiBackend

    _, profile, dom = libvmi.test_image
    with LibvmiBackend("toy", profile) as backend:
        tasks = backend.kernel.tasks(threads=True, exe=True)
        assert [(t.pid, t.tgid, t.comm, t.ppid) for t in tasks] == [
            (0, 0, "swapper/0", 0), (1, 1, "init", 0), (2, 2, "kthreadd", 0), (42, 42, "httpd", 1),
            (43, 42, "httpd-worker", 1)]
        assert tasks[2].cr3 is None and tasks[2].kernel_thread
        assert tasks[3].cr3 == dom.pids[42] and tasks[3].exe == "/bin/busybox"
        # process reads: by pid (LibVMI translates) and by CR3 (our page walk over LibVMI's read_pa)
        assert backend.read_va(0x7FFF_F000_0FF8, 8, pid=42) == b"/etc/sha"
        assert backend.read_va(0x7FFF_F000_0FF8, 8, cr3=dom.pids[42]) == b"/etc/sha"
        assert backend.kernel.read_user_string(dom.pids[42], 0x7FFF_F000_0FF8) == "/etc/shadow"
        assert backend.translate_ksym2v("__x64_sys_openat") == START_KERNEL_MAP + 0x18_0000
        # the tracer's per-event path: GS base -> current task -> identity
        gs = dom.registers[0]["gs_base"]  # from the event's registers, in a tracer
        current = backend.kernel.current_task(gs)
        assert backend.kernel.task(current).comm == "httpd"
        assert backend.get_vcpureg("CR3", vcpu=0) == dom.pids[42]
        assert backend.get_vcpureg("rip") == START_KERNEL_MAP + 0x18_0000
        with backend.paused():
            assert dom.paused
            with backend.paused():  # nested: only the outermost resumes
                pass
            assert dom.paused
        assert not dom.paused


def test_errors_are_clear(libvmi: Any) -> None:
    from vims.collector.backends import BackendError, LibvmiBackend

    _, profile, _ = libvmi.test_image
    with pytest.raises(BackendError, match="cannot attach to domain 'nope'"):
        LibvmiBackend("nope", profile)
    backend = LibvmiBackend("toy", profile)
    with pytest.raises(BackendError, match="cannot read 8 bytes at 0x7fffe0000000"):
        backend.read_va(0x7FFF_E000_0000, 8, pid=42)
    with pytest.raises(BackendError, match="no process with pid 7"):
        backend.pid_to_dtb(7)
    with pytest.raises(BackendError, match="X86Reg has no register 'gs_base'"):
        backend.get_vcpureg("gs_base")  # the Python binding's X86Reg lacks FS/GS base
    with pytest.raises(BackendError, match="knows no kernel symbol"):
        backend.translate_ksym2v("no_such_symbol")
    backend.close()


def test_mapped_memory_gives_the_same_view(libvmi: Any) -> None:
    from vims.collector.backends import LibvmiBackend

    img, profile, _ = libvmi.test_image
    direct = KernelView(PhysicalMemory(bytes(img.ram)), profile)
    with LibvmiBackend("toy", profile) as backend:
        assert backend.kernel.tasks(threads=True, exe=True) == direct.tasks(threads=True, exe=True)
    assert not direct.la57 and direct.page_offset_base == POB
    assert direct.current_task(direct.per_cpu_base(0)) == POB + 0x20_2000


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from vims.collector.backends import LibvmiBackend

    monkeypatch.setitem(sys.modules, "libvmi", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'vims\[libvmi\]'"):
        LibvmiBackend("any")


def test_int3_and_single_step_events_follow_libvmi(libvmi: Any) -> None:
    """The breakpoint dance a LibVMI tracer does: INT3 -> restore byte, step -> re-arm."""
    from libvmi import INIT_DOMAINNAME, INIT_EVENTS, Libvmi, X86Reg
    from libvmi.event import EventResponse, IntEvent, SingleStepEvent

    _, _, dom = libvmi.test_image
    target = START_KERNEL_MAP + 0x18_0000
    seen: list[tuple[str, int, int]] = []
    with Libvmi("toy", INIT_DOMAINNAME | INIT_EVENTS) as vmi:
        original = vmi.read_va(target, 0, 1)[0]
        vmi.write_va(target, 0, b"\xcc")

        def on_int3(vmi: Any, event: Any) -> Any:
            regs = event.cffi_event.x86_regs
            seen.append(("int3", event.cffi_event.vcpu_id, regs.rax))
            event.reinject = 0  # ours, not the guest's
            vmi.write_va(regs.rip, 0, original)
            return EventResponse.TOGGLE_SINGLESTEP

        def on_step(vmi: Any, event: Any) -> Any:
            seen.append(("step", event.cffi_event.vcpu_id, event.cffi_event.x86_regs.rax))
            vmi.write_va(target, 0, b"\xcc")
            return EventResponse.TOGGLE_SINGLESTEP

        vmi.register_event(IntEvent(on_int3))
        for vcpu in range(vmi.get_num_vcpus()):
            vmi.register_event(SingleStepEvent([vcpu], on_step, enable=False))
        dom.execute(1, target, rax=59)
        dom.execute(0, target + 1, rax=1)  # no breakpoint there: no event
        vmi.listen(500)
        assert seen == [("int3", 1, 59), ("step", 1, 59)]
        assert vmi.read_va(target, 0, 1)[0] == b"\xcc" and dom.reinjected == 0
        assert vmi.get_vcpureg(X86Reg.RAX.value, 1) == 59
        with pytest.raises(TypeError):
            vmi.get_vcpureg(X86Reg.RAX, 1)  # the real binding takes the reg_t number, not the enum


def test_checks_run_on_any_backend_and_declare_what_they_need(libvmi: Any) -> None:
    """The toy kernel has no text symbols or pid allocator: the checks say so instead of crashing."""
    from vims.collector.backends import LibvmiBackend
    from vims.collector.checks import Context, registry, run_checks

    _, profile, _ = libvmi.test_image
    with LibvmiBackend("toy", profile) as backend:
        rows = run_checks(Context(backend), [c() for c in registry().values()])
    assert {r.check: r.status for r in rows} == dict.fromkeys(registry(), "error")
    by_check = {r.check: r.detail for r in rows}
    assert by_check["kernel-text"] == "the kernel profile lacks _stext, _etext"
    assert "init_pid_ns" in by_check["hidden-processes"]
    assert "no reference root file system" in by_check["process-binaries"]


def test_a_write_watch_on_a_page_reports_the_writer(libvmi: Any) -> None:
    """A MemEvent on the frame of a per-cpu slot (the tracer's syscall trap, on LibVMI)."""
    from libvmi import INIT_DOMAINNAME, INIT_EVENTS, Libvmi
    from libvmi.event import EventResponse, MemAccess, MemEvent

    _, _, dom = libvmi.test_image
    slot = POB + 0x3A_0000 + 0x14
    seen: list[tuple[int, int, int]] = []

    def on_write(vmi: Any, event: Any) -> Any:
        seen.append((event.cffi_event.x86_regs.rax, event.gla, event.out_access))
        return EventResponse.NONE

    with Libvmi("toy", INIT_DOMAINNAME | INIT_EVENTS) as vmi:
        gfn = vmi.translate_kv2p(slot) >> 12
        event = MemEvent(MemAccess.W, on_write, gfn=gfn)
        vmi.register_event(event)
        dom.access(0, slot, b"\x01" * 8, rax=39)  # a write: seen
        dom.access(0, slot)  # a read: not watched
        dom.access(0, POB + 0x3B_0000, b"\x02", rax=1)  # another frame: not watched
        vmi.listen(0)
        assert seen == [(39, slot, MemAccess.W.value)]
        assert vmi.read_va(slot, 0, 8)[0] == b"\x01" * 8
        vmi.clear_event(event)
        dom.access(0, slot, b"\x03", rax=2)
        vmi.listen(0)
        assert len(seen) == 1
