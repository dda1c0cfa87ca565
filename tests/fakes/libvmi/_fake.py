"""The test side of the fake: domains made of a memory image and scripted vCPUs.

A test creates a :class:`FakeDomain` (which registers itself under its name), then opens it as the
real code would, ``Libvmi(name, INIT_DOMAINNAME | INIT_EVENTS)``. To produce events, the test makes
a vCPU *reach* an instruction with :meth:`FakeDomain.execute`: if the byte there is ``0xCC`` and an
``IntEvent`` (INT3) is registered, an interrupt event is queued; if single-stepping is on for that
vCPU, a single-step event follows the instruction. ``Libvmi.listen(timeout)`` delivers queued
events to their callbacks, in order, and applies the callbacks' responses
(``EventResponse.TOGGLE_SINGLESTEP``) as LibVMI does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from vims.collector.memory import AddressSpace, GuestMemoryError, PhysicalMemory

#: Open domains by name (what the hypervisor would know).
DOMAINS: dict[str, FakeDomain] = {}

#: Register fields of ``x86_regs`` in LibVMI's ``x86_registers_t`` (a subset).
X86_FIELDS = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15", "rflags", "dr6", "dr7", "rip", "cr0", "cr2", "cr3", "cr4", "sysenter_cs", "sysenter_esp",
    "sysenter_eip", "msr_efer", "msr_star", "msr_lstar", "fs_base", "gs_base", "cs_arbytes",
    "_pad", "shadow_gs",
)


class Struct:
    """A stand-in for a cffi struct: attributes with zero defaults."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        return f"Struct({self.__dict__})"


def new_cffi_event() -> Struct:
    """A zeroed ``vmi_event_t``: the sub-structures the Python events read and write."""
    return Struct(
        version=0, type=0, slat_id=0, data=None, callback=None, vcpu_id=0,
        x86_regs=Struct(**dict.fromkeys(X86_FIELDS, 0)),
        mem_event=Struct(gfn=0, in_access=0, out_access=0, generic=0, gptw=0, gla_valid=0, gla=0, offset=0),
        reg_event=Struct(reg=0, in_access=0, out_access=0, equal=0, value=0, previous=0),
        ss_event=Struct(vcpus=0, enable=0, gfn=0, offset=0, gla=0),
        interrupt_event=Struct(intr=0, reinject=-1, gla=0, gfn=0, offset=0, insn_length=0),
        debug_event=Struct(reinject=-1, gla=0, _gfn=0, offset=0, type=0, insn_length=0),
    )


@dataclass
class FakeDomain:
    """A guest: physical memory, kernel page tables, processes and vCPU registers.

    Parameters
    ----------
    name : str
        The domain name ``Libvmi(name)`` opens.
    ram : bytearray
        Guest physical memory (writes through the fake land here).
    kernel_dtb : int
        Page-table root of the kernel (``pid`` 0).
    la57 : bool
        5-level paging.
    symbols : dict
        Kernel symbols ``translate_ksym2v`` resolves (LibVMI's own profile).
    pids : dict
        Page-table root of each process, for ``read_va(vaddr, pid, ...)`` and ``pid_to_dtb``.
    vcpus : int
        Number of vCPUs; each starts with zeroed registers (set ``registers[vcpu][...]``).
    """

    name: str
    ram: bytearray
    kernel_dtb: int = 0
    la57: bool = False
    symbols: dict[str, int] = field(default_factory=dict)
    pids: dict[int, int] = field(default_factory=dict)
    vcpus: int = 1
    registers: list[dict[str, int]] = field(default_factory=list)
    paused: bool = False
    events_enabled: bool = False
    events: list[Any] = field(default_factory=list)
    pending: deque[tuple[Any, ...]] = field(default_factory=deque)
    singlestep: set[int] = field(default_factory=set)
    reinjected: int = 0
    destroyed: bool = False

    def __post_init__(self) -> None:
        if not self.registers:
            self.registers = [dict.fromkeys(X86_FIELDS, 0) for _ in range(self.vcpus)]
        DOMAINS[self.name] = self

    def close(self) -> None:
        """Forget the domain (the test is over)."""
        DOMAINS.pop(self.name, None)

    # -- memory ------------------------------------------------------------------------------------
    def memory(self) -> PhysicalMemory:
        return PhysicalMemory(self.ram)

    def space(self, dtb: int) -> AddressSpace:
        return AddressSpace(self.memory(), dtb, self.la57)

    def translate(self, vaddr: int, dtb: int) -> int:
        return self.space(dtb).translate(vaddr)

    def read_va(self, vaddr: int, dtb: int, count: int) -> bytes:
        """Read up to ``count`` bytes; stops at the first unmapped page (what LibVMI reports read)."""
        space = self.space(dtb)
        out = b""
        while len(out) < count:
            try:
                pa = space.translate(vaddr + len(out))
            except GuestMemoryError:
                break
            n = min(count - len(out), 0x1000 - ((vaddr + len(out)) & 0xFFF))
            if pa + n > len(self.ram):
                break
            out += bytes(self.ram[pa:pa + n])
        return out

    def write_va(self, vaddr: int, dtb: int, data: bytes) -> int:
        space = self.space(dtb)
        done = 0
        while done < len(data):
            try:
                pa = space.translate(vaddr + done)
            except GuestMemoryError:
                break
            n = min(len(data) - done, 0x1000 - ((vaddr + done) & 0xFFF))
            self.ram[pa:pa + n] = data[done:done + n]
            done += n
        return done

    # -- vCPUs -------------------------------------------------------------------------------------
    def execute(self, vcpu: int, rip: int, **regs: int) -> None:
        """Make ``vcpu`` reach the instruction at ``rip`` (kernel address space unless ``cr3`` given).

        Registers in ``regs`` are set first (``rax=39``, ``cr3=...``). Events are queued for the
        next ``listen`` with a snapshot of the registers (the vCPU waits for LibVMI's answer);
        a paused domain runs nothing (LibVMI's pause stops every vCPU).
        """
        if self.paused:
            raise RuntimeError(f"domain {self.name!r} is paused: its vCPUs cannot execute")
        state = self.registers[vcpu]
        state.update(regs)
        state["rip"] = rip
        dtb = state.get("cr3") or self.kernel_dtb
        try:
            opcode = self.read_va(rip, dtb, 1)
        except GuestMemoryError:
            opcode = b""
        if opcode == b"\xcc" and self.events_enabled:
            for event in self.events:
                if type(event).__name__ == "IntEvent" and event.intr.name == "INT3":
                    self.pending.append((event, vcpu, dict(state), None))
                    break
            else:
                self.reinjected += 1  # no handler: the guest gets its own #BP
        # After the instruction, a single-step event if stepping is on for this vCPU.
        self.pending.append((None, vcpu, dict(state), None))

    def access(self, vcpu: int, vaddr: int, data: bytes | None = None, **regs: int) -> None:
        """Make ``vcpu`` access guest memory at ``vaddr``: a write of ``data``, or a read if None.

        The access goes through the vCPU's page tables (its ``cr3``, else the kernel's). A ``MemEvent``
        registered for the page's frame (or a generic one) whose access mask covers the access is
        queued for the next ``listen``; the write itself is applied (as LibVMI's emulation would).
        """
        if self.paused:
            raise RuntimeError(f"domain {self.name!r} is paused: its vCPUs cannot execute")
        state = self.registers[vcpu]
        state.update(regs)
        dtb = state.get("cr3") or self.kernel_dtb
        paddr = self.translate(vaddr, dtb)
        kind = 1 << 2 if data is not None else 1 << 1  # MemAccess.W / MemAccess.R
        if self.events_enabled:
            for event in self.events:
                if type(event).__name__ != "MemEvent" or not event.in_access.value & kind:
                    continue
                if event.generic or event._gfn == paddr >> 12:
                    self.pending.append((event, vcpu, dict(state), {
                        "gla": vaddr, "gfn": paddr >> 12, "offset": paddr & 0xFFF, "out_access": kind}))
                    break
        if data is not None:
            self.write_va(vaddr, dtb, data)
        self.pending.append((None, vcpu, dict(state), None))

    def _singlestep_event(self, vcpu: int) -> Any:
        for event in self.events:
            if type(event).__name__ == "SingleStepEvent" and event.vcpus & (1 << vcpu):
                return event
        return None
