"""The QEMU backend: guest RAM mapped from the memory-backend file, vCPUs through the GDB stub.

Memory reads never touch the GDB stub (nanoseconds instead of a packet round trip, and they work
while a tracer holds the stub, which serves one client at a time). The stub is connected only when
registers or pause/resume are asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vims.collector.backends.base import Backend, BackendError, check_register
from vims.collector.memory import PhysicalMemory
from vims.errors import VimsError

# QEMU's GDB stub calls the flags register "eflags".
_GDB_NAMES = {"rflags": "eflags"}


class QemuBackend(Backend):
    """A QEMU guest started with a shared memory-backend file and ``-gdb tcp:HOST:PORT``.

    Parameters
    ----------
    memory_path : str, Path or PhysicalMemory
        The memory-backend file (``mem-path=`` of ``-object memory-backend-file``), or memory
        mapped elsewhere (not closed by this backend).
    profile : KernelProfile, optional
        The guest kernel's profile.
    gdb_address : (host, port), optional
        The GDB stub; without it only memory reads work.
    gdb : GdbStub, optional
        An open stub connection to use instead of connecting to ``gdb_address``.
    on_close : callable, optional
        Called once when the backend closes (an attached VM's detach).

    Open one on a running guest with :meth:`from_guest`, and close it (``with``): that unmaps the
    memory and detaches from the stub, which removes every trap left in the guest.
    """

    name = "qemu"

    def __init__(self, memory_path: str | Path | PhysicalMemory, profile: Any = None,
                 gdb_address: tuple[str, int] | None = None, gdb: Any = None,
                 on_close: Callable[[], None] | None = None) -> None:
        if isinstance(memory_path, PhysicalMemory):  # mapped elsewhere: its owner closes it
            self.memory, self._owns_memory = memory_path, False
            self.memory_path: Path | None = None
        else:
            self.memory_path = Path(memory_path)
            self.memory, self._owns_memory = PhysicalMemory.open(self.memory_path), True
        self.profile = profile
        self.gdb_address = gdb_address
        self._gdb = gdb
        self._owns_gdb = gdb is None
        self._pauses = 0
        self._halted = False
        self._on_close = on_close
        #: The :class:`~vims.collector.guest.Guest` this backend was opened on, if any.
        self.guest: Any = None

    @classmethod
    def from_guest(cls, guest: Any, profile: Any = None) -> QemuBackend:
        """The backend of a running guest: a :class:`vims.collector.guest.Guest`, the name of one
        started by ``vims guest up``, or an :class:`~vims.collector.attach.AttachedVm`.

        ``profile``: the kernel's profile when the caller knows it already (the one a tracer of this
        boot traces), not looked up in the guest's RAM again (a lookup watches the kernels' clocks).

        Maps its memory at once; connects to its GDB stub only when registers, pause/resume or
        :attr:`gdb` are first used (the stub serves one client at a time: memory-only users such as
        the checks never hold it). A guest that is not running is a :class:`~vims.errors.VimsError`.
        """
        if getattr(guest, "kind", None) == "attached":  # a VM VIMS did not start (vims.collector.attach)
            return guest.backend()
        if isinstance(guest, str):
            from vims.collector.guest import Guest

            guest = Guest.attach(guest)
        if not guest.running:
            raise VimsError(f"the guest {guest.name!r} is not running (QEMU pid {guest.pid} is gone): "
                            f"`vims guest down --name {guest.name}`, then `vims guest up`")
        backend = cls(guest.memory_path, guest.profile if profile is None else profile, tuple(guest.gdb_address))
        backend.guest = guest
        return backend


    @property
    def gdb(self) -> Any:
        """The :class:`~vims.collector.gdbstub.GdbStub` connection (opened on first use)."""
        if self._gdb is None:
            if self.gdb_address is None:
                raise BackendError("no GDB stub address: this QEMU backend can only read memory")
            from vims.collector.gdbstub import GdbStub

            host, port = self.gdb_address
            self._gdb = GdbStub(host, int(port))
        return self._gdb

    def get_vcpureg(self, name: str, vcpu: int = 0) -> int:
        name = check_register(name)
        gdb = self.gdb
        running = gdb.running
        if running:
            gdb.halt()
        try:
            regs = gdb.registers(vcpu)
        finally:
            if running:
                gdb.resume()
        return int(regs[_GDB_NAMES.get(name, name)])

    def pause(self) -> None:
        # Nested pauses (a check inside a paused block) resume only at the outermost level.
        if self._pauses == 0:
            self._halted = self.gdb.running
            if self._halted:
                self.gdb.halt()
        self._pauses += 1

    def resume(self) -> None:
        if self._pauses == 0:
            return
        self._pauses -= 1
        if self._pauses == 0 and self._halted:
            self.gdb.resume()

    def close(self) -> None:
        if self._gdb is not None and self._owns_gdb:
            self._gdb.close()
            self._gdb = None
        if self._owns_memory:
            self.memory.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()
