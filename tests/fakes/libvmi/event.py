"""``libvmi.event`` of the fake: the real classes, over a stand-in for the cffi ``vmi_event_t``."""

# The real module's names, values and signatures (libvmi/python, libvmi/event.py).
# ruff: noqa: UP004
from __future__ import annotations

from enum import Enum
from typing import Any

from ._fake import new_cffi_event

EVENTS_VERSION = 0x00000006


class EventType(Enum):
    INVALID = 0
    MEMORY = 1
    REGISTER = 2
    SINGLESTEP = 3
    INTERRUPT = 4
    GUEST_REQUEST = 5
    CPUID = 6
    DEBUG_EXCEPTION = 7
    PRIVILEGED_CALL = 8
    DESCRIPTOR_ACCESS = 9


class EventResponse(Enum):
    NONE = 0
    EMULATE = 1 << 1
    EMULATE_NOWRITE = 1 << 2
    SET_EMUL_READ_DATA = 1 << 3
    DENY = 1 << 4
    TOGGLE_SINGLESTEP = 1 << 5
    SLAT_ID = 1 << 6
    VMM_PAGETABLE_ID = 1 << 6
    SET_REGISTERS = 1 << 7
    SET_EMUL_INSN = 1 << 8
    GET_NEXT_INTERRUPT = 1 << 9


class MemAccess(Enum):
    INVALID = 0
    N = 1 << 0
    R = 1 << 1
    W = 1 << 2
    X = 1 << 3
    RW = (1 << 1) | (1 << 2)
    RX = (1 << 1) | (1 << 3)
    WX = (1 << 2) | (1 << 3)
    RWX = (1 << 1) | (1 << 2) | (1 << 3)
    W2X = 1 << 4
    RWX2N = 1 << 5


class RegAccess(Enum):
    INVALID = 0
    N = 1 << 0
    R = 1 << 1
    W = 1 << 2
    RW = (1 << 1) | (1 << 2)


class InterruptType(Enum):
    INVALID = 0
    INT3 = 1
    NEXT = 2


def generic_event_callback(cffi_vmi: Any, cffi_event: Any) -> int:
    """What LibVMI calls: the Python callback of the event, its response as an int."""
    event = cffi_event.data["event"]
    event_response = event.py_callback(event.vmi, event)
    if event_response is None:
        event_response = EventResponse.NONE
    return event_response.value


class Event(object):
    version = EVENTS_VERSION
    type: EventType | None = None

    def __init__(self, callback: Any, slat_id: int = 0, data: Any = None) -> None:
        self.slat_id = slat_id
        self.data = data
        self._py_callback = callback
        self._vmi: Any = None
        self.generic_data = {"event": self}
        self.generic_handle: Any = None
        self._cffi_event = new_cffi_event()

    @property
    def vmi(self) -> Any:
        return self._vmi

    @vmi.setter
    def vmi(self, vmi: Any) -> None:
        self._vmi = vmi

    @property
    def py_callback(self) -> Any:
        return self._py_callback

    @py_callback.setter
    def py_callback(self, callback: Any) -> None:
        self._py_callback = callback

    @property
    def cffi_event(self) -> Any:
        return self._cffi_event

    def to_cffi(self) -> Any:
        assert self.type is not None
        self._cffi_event.version = self.version
        self._cffi_event.type = self.type.value
        self._cffi_event.slat_id = self.slat_id
        self.generic_handle = self.generic_data
        self._cffi_event.data = self.generic_handle
        self._cffi_event.callback = generic_event_callback
        return self._cffi_event

    def to_dict(self) -> dict[str, Any]:
        assert self.type is not None
        return {
            "version": self.version,
            "type": self.type.name,
            "slat_id": self.slat_id,
            "data": self.data,
            "vcpu_id": self._cffi_event.vcpu_id,
            "x86_regs": {
                "rax": hex(self._cffi_event.x86_regs.rax),
                "rsp": hex(self._cffi_event.x86_regs.rsp),
                "rip": hex(self._cffi_event.x86_regs.rip),
            },
        }


class MemEvent(Event):
    type = EventType.MEMORY

    def __init__(self, in_access: MemAccess, callback: Any, gfn: int = 0, generic: bool = False,
                 slat_id: int = 0, data: Any = None) -> None:
        super().__init__(callback, slat_id, data)
        self.in_access = in_access
        self.generic = generic
        self._gfn = gfn

    @property
    def gfn(self) -> int:
        return int(self._cffi_event.mem_event.gfn)

    @property
    def out_access(self) -> int:
        return int(self._cffi_event.mem_event.out_access)

    @property
    def gla(self) -> int:
        return int(self._cffi_event.mem_event.gla)

    @property
    def offset(self) -> int:
        return int(self._cffi_event.mem_event.offset)

    def to_cffi(self) -> Any:
        super().to_cffi()
        self._cffi_event.mem_event.in_access = self.in_access.value
        self._cffi_event.mem_event.generic = int(self.generic)
        self._cffi_event.mem_event.gfn = (1 << 64) - 1 if self.generic else self._gfn
        return self._cffi_event


class SingleStepEvent(Event):
    type = EventType.SINGLESTEP

    def __init__(self, vcpus: Any, callback: Any, enable: bool = True, slat_id: int = 0,
                 data: Any = None) -> None:
        super().__init__(callback, slat_id, data)
        self.vcpus = 0
        for vcpu in vcpus:
            self.vcpus |= 1 << vcpu
        self.enable = enable

    def to_cffi(self) -> Any:
        super().to_cffi()
        self._cffi_event.ss_event.vcpus = self.vcpus
        self._cffi_event.ss_event.enable = int(self.enable)
        return self._cffi_event


class RegEvent(Event):
    type = EventType.REGISTER

    def __init__(self, register: Any, in_access: RegAccess, callback: Any, equal: int | None = None,
                 slat_id: int = 0, data: Any = None) -> None:
        super().__init__(callback, slat_id, data)
        self.register = register
        self.in_access = in_access
        self.equal = 0 if equal is None else equal

    @property
    def value(self) -> int:
        return int(self._cffi_event.reg_event.value)

    @value.setter
    def value(self, v: int) -> None:
        self._cffi_event.reg_event.value = v

    def to_cffi(self) -> Any:
        super().to_cffi()
        self._cffi_event.reg_event.reg = self.register.value
        self._cffi_event.reg_event.in_access = self.in_access.value
        self._cffi_event.reg_event.equal = self.equal
        return self._cffi_event


class IntEvent(Event):
    type = EventType.INTERRUPT

    def __init__(self, callback: Any, intr: InterruptType = InterruptType.INT3, reinject: int = -1,
                 slat_id: int = 0, data: Any = None) -> None:
        super().__init__(callback, slat_id, data)
        self.intr = intr
        self._reinject = reinject

    @property
    def reinject(self) -> int:
        return self._reinject

    @reinject.setter
    def reinject(self, value: int) -> None:
        # the event callback sets whether the guest gets the interrupt too
        self._reinject = value
        self._cffi_event.interrupt_event.reinject = self._reinject

    def to_cffi(self) -> Any:
        super().to_cffi()
        self._cffi_event.interrupt_event.intr = self.intr.value
        self._cffi_event.interrupt_event.reinject = self._reinject
        return self._cffi_event

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["intr"] = self.intr.name
        d["reinject"] = self._reinject
        return d


class DebugEvent(Event):
    type = EventType.DEBUG_EXCEPTION

    def __init__(self, callback: Any, reinject: int = -1, slat_id: int = 0, data: Any = None) -> None:
        super().__init__(callback, slat_id, data)
        self._reinject = reinject

    @property
    def reinject(self) -> int:
        return self._reinject

    @reinject.setter
    def reinject(self, value: int) -> None:
        self._reinject = value
        self._cffi_event.debug_event.reinject = self._reinject

    def to_cffi(self) -> Any:
        super().to_cffi()
        self._cffi_event.debug_event.reinject = self._reinject
        return self._cffi_event
