"""``libvmi.libvmi`` of the fake: the ``Libvmi`` class with the real signatures, over a FakeDomain."""

# The real module's names, values and signatures (libvmi/python, libvmi/libvmi.py).
# ruff: noqa: UP004
from __future__ import annotations

from enum import Enum
from typing import Any

from . import _fake
from .event import EventResponse, EventType

INIT_DOMAINNAME = 1 << 0
INIT_DOMAINID = 1 << 1
INIT_EVENTS = 1 << 2


class LibvmiError(Exception):
    pass


class X86Reg(Enum):
    RAX = 0
    RBX = 1
    RCX = 2
    RDX = 3
    RBP = 4
    RSI = 5
    RDI = 6
    RSP = 7
    R8 = 8
    R9 = 9
    R10 = 10
    R11 = 11
    R12 = 12
    R13 = 13
    R14 = 14
    R15 = 15
    RIP = 16
    RFLAGS = 17
    CR0 = 18
    CR2 = 19
    CR3 = 20
    CR4 = 21
    DR0 = 23
    DR1 = 24
    DR2 = 25
    DR3 = 26
    DR6 = 27
    DR7 = 28


class VMIMode(Enum):
    XEN = 0
    KVM = 1
    FILE = 2


class VMIConfig(Enum):
    GLOBAL_FILE_ENTRY = 0
    STRING = 1
    DICT = 2
    JSON_PATH = 3
    FILE_PATH = 4


class VMIStatus(Enum):
    SUCCESS = 0
    FAILURE = 1


class LibvmiInitError(Enum):
    NONE = 0
    DRIVER_NOT_DETECTED = 1
    DRIVER = 2
    VM_NOT_FOUND = 3
    PAGING = 4
    OS = 5
    EVENTS = 6
    NO_CONFIG = 7
    NO_CONFIG_ENTRY = 8


class PageMode(Enum):
    UNKNOWN = 0
    LEGACY = 1
    PAE = 2
    IA32E = 3
    AARCH32 = 4
    AARCH64 = 5


class VMIArch(Enum):
    VMI_ARCH_UNKNOWN = 0
    VMI_ARCH_X86 = 1
    VMI_ARCH_X86_64 = 2
    VMI_ARCH_ARM32 = 3
    VMI_ARCH_ARM64 = 4


class VMIOS(Enum):
    UNKNOWN = 0
    LINUX = 1
    WINDOWS = 2


class VMIWinVer(Enum):
    OS_WINDOWS_NONE = 0
    OS_WINDOWS_UNKNOWN = 1


class TranslateMechanism(Enum):
    NONE = 0
    PROCESS_DTB = 1
    PROCESS_PT = 2
    PROCESS_PID = 3
    KERNEL_SYMBOL = 4


class AccessContext(object):
    def __init__(self, tr_mechanism: TranslateMechanism = TranslateMechanism.NONE, addr: int = 0,
                 ksym: str | None = None, dtb: int = 0, pid: int = 0) -> None:
        if not isinstance(tr_mechanism, TranslateMechanism):
            raise RuntimeError("must specify a valid TranslateMechanism")
        self.tr_mechanism = tr_mechanism
        if self.tr_mechanism == TranslateMechanism.KERNEL_SYMBOL:
            if not isinstance(ksym, str):
                raise RuntimeError("ksym must be a string")
            self.ksym = ksym
        self.addr = addr
        self.dtb = dtb
        self.pid = pid


class Registers:
    """``regs[X86Reg.RIP]`` over a vCPU's register dict."""

    def __init__(self, regs: dict[str, int] | None = None) -> None:
        self.cffi_regs = dict(regs or {})

    def __getitem__(self, index: X86Reg) -> int:
        if not isinstance(index, X86Reg):
            raise RuntimeError("Must be an X86Reg enum value")
        return self.cffi_regs.get(_FIELD[index.value], 0)

    def __setitem__(self, index: X86Reg, value: int) -> None:
        if not isinstance(index, X86Reg):
            raise RuntimeError("Must be an X86Reg enum value")
        self.cffi_regs[_FIELD[index.value]] = value


#: reg_t value -> field of x86_regs
_FIELD = {r.value: ("rflags" if r.name == "RFLAGS" else r.name.lower()) for r in X86Reg}


def check(status: int, error: str = "VMI_FAILURE") -> None:
    if VMIStatus(status) != VMIStatus.SUCCESS:
        raise LibvmiError(error)


class Libvmi(object):
    __slots__ = ("_dom", "opaque_vmi", "vmi")

    def __init__(self, domain: str, init_flags: int = INIT_DOMAINNAME, init_data: Any = None,
                 config_mode: VMIConfig = VMIConfig.GLOBAL_FILE_ENTRY, config: Any = None,
                 mode: VMIMode | None = None, partial: bool = False) -> None:
        if not init_flags & (INIT_DOMAINNAME | INIT_DOMAINID):
            raise RuntimeError("init_flags must be either INIT_DOMAINAME or INIT_DOMAINID")
        dom = _fake.DOMAINS.get(str(domain))
        if dom is None or dom.destroyed:
            raise LibvmiError(LibvmiInitError.VM_NOT_FOUND.name)
        self._dom = dom
        dom.events_enabled = bool(init_flags & INIT_EVENTS)
        self.vmi: Any = dom
        self.opaque_vmi: Any = [dom]

    def __enter__(self) -> Libvmi:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        self.destroy()

    def destroy(self) -> None:
        if self.vmi:
            self._dom.events.clear()
            self._dom.pending.clear()
            if self._dom.paused:  # LibVMI resumes a VM it paused when it lets go
                self._dom.paused = False
        self.opaque_vmi = None
        self.vmi = None

    def _live(self) -> _fake.FakeDomain:
        if not self.vmi:
            raise LibvmiError("VMI_FAILURE")
        return self._dom

    # -- translations --------------------------------------------------------------------------
    def _dtb(self, pid: int) -> int:
        dom = self._live()
        if pid == 0:
            return dom.kernel_dtb
        if pid not in dom.pids:
            raise LibvmiError("VMI_FAILURE")
        return dom.pids[pid]

    def _translate(self, vaddr: int, dtb: int) -> int:
        try:
            return self._live().translate(vaddr, dtb)
        except _fake.GuestMemoryError:
            raise LibvmiError("VMI_FAILURE") from None

    def translate_kv2p(self, vaddr: int) -> int:
        return self._translate(vaddr, self._live().kernel_dtb)

    def translate_uv2p(self, vaddr: int, pid: int) -> int:
        return self._translate(vaddr, self._dtb(pid))

    def translate_ksym2v(self, symbol: str) -> int:
        symbols = self._live().symbols
        if symbol not in symbols:
            raise LibvmiError("VMI_FAILURE")
        return symbols[symbol]

    def pid_to_dtb(self, pid: int) -> int:
        return self._dtb(pid)

    def dtb_to_pid(self, dtb: int) -> int:
        for pid, value in self._live().pids.items():
            if value == dtb:
                return pid
        raise LibvmiError("VMI_FAILURE")

    def pagetable_lookup(self, dtb: int, vaddr: int) -> int:
        return self._translate(vaddr, dtb)

    # -- reads -----------------------------------------------------------------------------------
    def _ctx_dtb(self, ctx: AccessContext) -> tuple[int, int]:
        dom = self._live()
        mech = ctx.tr_mechanism
        if mech == TranslateMechanism.KERNEL_SYMBOL:
            return self.translate_ksym2v(ctx.ksym), dom.kernel_dtb
        if mech == TranslateMechanism.PROCESS_DTB:
            return ctx.addr, ctx.dtb
        if mech == TranslateMechanism.PROCESS_PID:
            return ctx.addr, self._dtb(ctx.pid)
        raise LibvmiError("VMI_FAILURE")

    def read(self, ctx: AccessContext, count: int) -> tuple[bytes, int]:
        if ctx.tr_mechanism == TranslateMechanism.NONE:
            return self.read_pa(ctx.addr, count)
        vaddr, dtb = self._ctx_dtb(ctx)
        data = self._live().read_va(vaddr, dtb, count)
        check(0 if len(data) == count else 1)
        return data, len(data)

    def read_va(self, vaddr: int, pid: int, count: int) -> tuple[bytes, int]:
        data = self._live().read_va(vaddr, self._dtb(pid), count)
        check(0 if len(data) == count else 1)
        return data, len(data)

    def read_pa(self, paddr: int, count: int, padding: bool = False) -> tuple[bytes, int]:
        ram = self._live().ram
        data = bytes(ram[paddr:paddr + count]) if 0 <= paddr < len(ram) else b""
        status = 0 if len(data) == count else 1
        if padding:
            read = len(data)
            return data + bytes(count - read), read
        check(status)
        return data, len(data)

    def read_ksym(self, symbol: str, count: int) -> tuple[bytes, int]:
        return self.read_va(self.translate_ksym2v(symbol), 0, count)

    def _read_int(self, vaddr: int, pid: int, size: int) -> int:
        data, _ = self.read_va(vaddr, pid, size)
        return int.from_bytes(data, "little")

    def read_8_va(self, vaddr: int, pid: int) -> int:
        return self._read_int(vaddr, pid, 1)

    def read_16_va(self, vaddr: int, pid: int) -> int:
        return self._read_int(vaddr, pid, 2)

    def read_32_va(self, vaddr: int, pid: int) -> int:
        return self._read_int(vaddr, pid, 4)

    def read_64_va(self, vaddr: int, pid: int) -> int:
        return self._read_int(vaddr, pid, 8)

    def read_addr_va(self, vaddr: int, pid: int) -> int:
        return self._read_int(vaddr, pid, 8)

    def read_addr_ksym(self, symbol: str) -> int:
        return self._read_int(self.translate_ksym2v(symbol), 0, 8)

    def read_64_pa(self, paddr: int) -> int:
        return int.from_bytes(self.read_pa(paddr, 8)[0], "little")

    def read_str_va(self, vaddr: int, pid: int) -> str:
        dom = self._live()
        dtb = self._dtb(pid)
        out = b""
        while True:
            chunk = dom.read_va(vaddr + len(out), dtb, 0x1000 - ((vaddr + len(out)) & 0xFFF))
            if not chunk:
                if not out:
                    raise LibvmiError("VMI_FAILURE")
                break
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                break
            out += chunk
        return out.decode()

    # -- writes ----------------------------------------------------------------------------------
    def write_va(self, vaddr: int, pid: int, buffer: bytes) -> int:
        done = self._live().write_va(vaddr, self._dtb(pid), bytes(buffer))
        check(0 if done == len(buffer) else 1)
        return done

    def write_pa(self, paddr: int, buffer: bytes) -> int:
        ram = self._live().ram
        if paddr < 0 or paddr + len(buffer) > len(ram):
            raise LibvmiError("VMI_FAILURE")
        ram[paddr:paddr + len(buffer)] = bytes(buffer)
        return len(buffer)

    def write(self, ctx: AccessContext, buffer: bytes) -> int:
        vaddr, dtb = self._ctx_dtb(ctx)
        done = self._live().write_va(vaddr, dtb, bytes(buffer))
        check(0 if done == len(buffer) else 1)
        return done

    # -- get_* -----------------------------------------------------------------------------------
    def get_name(self) -> str:
        return self._live().name

    def get_memsize(self) -> int:
        return len(self._live().ram)

    def get_max_physical_address(self) -> int:
        return len(self._live().ram)

    def get_num_vcpus(self) -> int:
        return self._live().vcpus

    def get_page_mode(self, vcpu: int) -> PageMode:
        return PageMode.IA32E

    def get_address_width(self) -> int:
        return 8

    def get_ostype(self) -> VMIOS:
        return VMIOS.LINUX

    def get_vcpureg(self, reg: int, vcpu: int) -> int:
        # The real binding hands `reg` to C: it must be the reg_t number (X86Reg.CR3.value).
        if not isinstance(reg, int) or isinstance(reg, bool):
            raise TypeError(f"an integer is required (got type {type(reg).__name__})")
        dom = self._live()
        if reg not in _FIELD or not 0 <= vcpu < dom.vcpus:
            raise LibvmiError("VMI_FAILURE")
        return dom.registers[vcpu].get(_FIELD[reg], 0)

    def get_vcpuregs(self, vcpu: int) -> Registers:
        dom = self._live()
        if not 0 <= vcpu < dom.vcpus:
            raise LibvmiError("VMI_FAILURE")
        return Registers(dom.registers[vcpu])

    def set_vcpureg(self, value: int, reg: int, vcpu: int) -> None:
        dom = self._live()
        if reg not in _FIELD or not 0 <= vcpu < dom.vcpus:
            raise LibvmiError("VMI_FAILURE")
        dom.registers[vcpu][_FIELD[reg]] = value

    def pause_vm(self) -> None:
        self._live().paused = True

    def resume_vm(self) -> None:
        self._live().paused = False

    # -- events ----------------------------------------------------------------------------------
    def register_event(self, event: Any) -> None:
        dom = self._live()
        if not dom.events_enabled:
            raise LibvmiError("VMI_FAILURE")  # the instance was not initialised with INIT_EVENTS
        event.vmi = self
        event.to_cffi()
        if event in dom.events:
            raise LibvmiError("VMI_FAILURE")
        dom.events.append(event)
        if event.type == EventType.SINGLESTEP and event.enable:
            for vcpu in range(dom.vcpus):
                if event.vcpus & (1 << vcpu):
                    dom.singlestep.add(vcpu)

    def clear_event(self, event: Any) -> None:
        dom = self._live()
        event.to_cffi()
        if event not in dom.events:
            raise LibvmiError("VMI_FAILURE")
        dom.events.remove(event)
        if event.type == EventType.SINGLESTEP:
            dom.singlestep.difference_update(v for v in range(dom.vcpus) if event.vcpus & (1 << v))

    def toggle_single_step_vcpu(self, event: Any, vcpu: int, enabled: bool) -> None:
        dom = self._live()
        event.to_cffi()
        if enabled:
            dom.singlestep.add(vcpu)
        else:
            dom.singlestep.discard(vcpu)

    def are_events_pending(self) -> int:
        return len(self._live().pending)

    def listen(self, timeout: int) -> None:
        """Deliver every queued event (the fake's vCPUs ran before; nothing waits ``timeout`` ms)."""
        dom = self._live()
        while dom.pending:
            event, vcpu, regs, access = dom.pending.popleft()
            if event is None:  # an instruction completed on `vcpu`
                if vcpu in dom.singlestep:
                    step = dom._singlestep_event(vcpu)
                    if step is None:
                        raise LibvmiError("VMI_FAILURE")
                    self._deliver(step, vcpu, regs)
                continue
            if event not in dom.events:  # cleared while queued
                continue
            if access:  # a memory access: where and how
                me = event.cffi_event.mem_event
                me.gla, me.gfn, me.offset, me.out_access = (access[k] for k in ("gla", "gfn", "offset",
                                                                                "out_access"))
                me.gla_valid = 1
            self._deliver(event, vcpu, regs)

    def _deliver(self, event: Any, vcpu: int, regs: dict[str, int]) -> None:
        dom = self._dom
        cffi = event.cffi_event
        cffi.vcpu_id = vcpu
        for name, value in regs.items():
            setattr(cffi.x86_regs, name, value)
        rip = regs.get("rip", 0)
        dtb = regs.get("cr3") or dom.kernel_dtb
        try:
            gfn = dom.translate(rip, dtb) >> 12
        except _fake.GuestMemoryError:
            gfn = 0
        if event.type == EventType.INTERRUPT:
            ie = cffi.interrupt_event
            ie.gla, ie.gfn, ie.offset, ie.insn_length = rip, gfn, rip & 0xFFF, 1
            event.reinject = -1
        elif event.type == EventType.SINGLESTEP:
            ss = cffi.ss_event
            ss.gla, ss.gfn, ss.offset = rip, gfn, rip & 0xFFF
        response = cffi.callback(self.opaque_vmi, cffi)
        if event.type == EventType.INTERRUPT:
            if event.reinject == -1:
                raise LibvmiError("interrupt event callback did not set reinject")
            if event.reinject:
                dom.reinjected += 1
        if response & EventResponse.TOGGLE_SINGLESTEP.value:
            if vcpu in dom.singlestep:
                dom.singlestep.discard(vcpu)
            else:
                if dom._singlestep_event(vcpu) is None:
                    raise LibvmiError("TOGGLE_SINGLESTEP without a registered SingleStepEvent for the vCPU")
                dom.singlestep.add(vcpu)
