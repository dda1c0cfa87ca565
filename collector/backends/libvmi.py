"""The LibVMI backend, for Xen and KVMi hosts, over the ``libvmi`` Python package.

``libvmi`` is an optional extra (``pip install 'vims[libvmi]'``; it needs the LibVMI C library) and
is imported only when a :class:`LibvmiBackend` is created. Calls follow the package's API:
``Libvmi(domain, INIT_DOMAINNAME | INIT_EVENTS)``, ``read_pa(paddr, count)`` and
``read_va(vaddr, pid, count)`` returning ``(bytes, bytes_read)``, ``translate_ksym2v(symbol)``,
``get_vcpureg(X86Reg.CR3.value, vcpu)``, ``pause_vm()``/``resume_vm()``; events through
:attr:`LibvmiBackend.vmi` (``register_event``, ``listen``) and ``libvmi.event``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from vims.collector.backends.base import Backend, BackendError, check_register
from vims.collector.memory import ReaderMemory
from vims.errors import MissingDependencyError


def import_libvmi() -> ModuleType:
    """The ``libvmi`` package, or a :class:`MissingDependencyError` that says how to get it."""
    try:
        return importlib.import_module("libvmi")
    except ImportError as exc:
        raise MissingDependencyError(
            "the LibVMI backend needs the `libvmi` Python package and the LibVMI C library: "
            "install LibVMI (https://libvmi.com), then `pip install 'vims[libvmi]'`"
        ) from exc


class LibvmiBackend(Backend):
    """A guest on a LibVMI-capable hypervisor.

    Parameters
    ----------
    domain : str
        The domain (VM) name, as the hypervisor knows it.
    profile : KernelProfile, optional
        The guest kernel's profile, for the kernel readers and checks (LibVMI has its own for
        its symbol lookups, from its configuration).
    events : bool, default True
        Initialise LibVMI's event support (``INIT_EVENTS``).
    vmi : Libvmi, optional
        An initialised instance to use instead of creating one.
    """

    name = "libvmi"

    def __init__(self, domain: str, profile: Any = None, events: bool = True, vmi: Any = None) -> None:
        lib = self._lib = import_libvmi()
        self.domain = domain
        self.profile = profile
        if vmi is None:
            flags = lib.INIT_DOMAINNAME | (lib.INIT_EVENTS if events else 0)
            try:
                vmi = lib.Libvmi(domain, flags)
            except lib.LibvmiError as exc:
                raise BackendError(f"LibVMI cannot attach to domain {domain!r}: {exc}") from exc
        self._vmi = vmi
        self._paused = 0
        self.memory = ReaderMemory(self._read_pa_raw, int(vmi.get_memsize()))

    @property
    def vmi(self) -> Any:
        """The ``libvmi.Libvmi`` instance (for events: ``register_event``, ``listen``)."""
        return self._vmi

    def _read_pa_raw(self, paddr: int, size: int) -> bytes:
        data, count = self._vmi.read_pa(paddr, size)
        return bytes(data[:count])

    def read_va(self, vaddr: int, size: int, *, cr3: int | None = None, pid: int | None = None) -> bytes:
        lib = self._lib
        try:
            if cr3 is not None:
                ctx = lib.AccessContext(lib.TranslateMechanism.PROCESS_DTB, addr=vaddr, dtb=cr3)
                data, count = self._vmi.read(ctx, size)
            else:
                data, count = self._vmi.read_va(vaddr, pid or 0, size)
        except lib.LibvmiError as exc:
            where = f"cr3 {cr3:#x}" if cr3 is not None else f"pid {pid or 0}"
            raise BackendError(f"LibVMI cannot read {size} bytes at {vaddr:#x} ({where}): {exc}") from exc
        if count != size:
            raise BackendError(f"short LibVMI read at {vaddr:#x}: {count} of {size} bytes")
        return bytes(data)

    def pid_to_dtb(self, pid: int) -> int:
        try:
            return int(self._vmi.pid_to_dtb(pid))
        except self._lib.LibvmiError as exc:
            raise BackendError(f"LibVMI finds no process with pid {pid}: {exc}") from exc

    def translate_ksym2v(self, symbol: str) -> int:
        try:
            return int(self._vmi.translate_ksym2v(symbol))
        except self._lib.LibvmiError:
            if self.profile is not None and self.profile.has_symbol(symbol):
                return int(self.profile.symbol(symbol))
            raise BackendError(f"LibVMI knows no kernel symbol {symbol!r}") from None

    def get_vcpureg(self, name: str, vcpu: int = 0) -> int:
        name = check_register(name)
        lib = self._lib
        try:
            reg = lib.X86Reg[name.upper()]
        except KeyError:
            raise BackendError(f"LibVMI's X86Reg has no register {name!r}") from None
        try:
            return int(self._vmi.get_vcpureg(reg.value, vcpu))
        except lib.LibvmiError as exc:
            raise BackendError(f"LibVMI cannot read {name} of vCPU {vcpu}: {exc}") from exc

    def pause(self) -> None:
        if self._paused == 0:
            self._vmi.pause_vm()
        self._paused += 1

    def resume(self) -> None:
        if self._paused == 0:
            return
        self._paused -= 1
        if self._paused == 0:
            self._vmi.resume_vm()

    def close(self) -> None:
        if self._vmi is not None:
            self._vmi.destroy()
            self._vmi = None
