"""The backend interface: what the collector needs from a hypervisor to look into a guest.

Two channels: *memory* (physical reads, and virtual reads through the guest's page tables) and
*vCPU control* (registers, pause/resume). Event delivery is the tracer's business and lives with
each backend's native object: :attr:`QemuBackend.gdb` for :class:`~vims.collector.tracer.SyscallTracer`,
:attr:`LibvmiBackend.vmi` for :class:`~vims.collector.tracer_libvmi.LibvmiSyscallTracer`.

Every backend exposes its memory as a :class:`~vims.collector.memory.PhysicalMemory`, so the kernel
readers (:class:`~vims.collector.kernel.KernelView`) and the integrity checks run unchanged on any of
them. A backend is the one way the collector attaches to a guest: open it
(:meth:`QemuBackend.from_guest`, :class:`LibvmiBackend`), hand it to a tracer or a check
:class:`~vims.collector.checks.Context`, and close it (``with``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vims.collector.kernel import KernelView
from vims.collector.memory import PhysicalMemory
from vims.errors import VimsError

#: Register names every backend understands (lower case, as the GDB stub names them).
REGISTERS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip", "rflags", "cr0", "cr2", "cr3", "cr4", "fs_base", "gs_base",
)


class BackendError(VimsError):
    """The hypervisor refused or could not do what was asked."""


class Backend(ABC):
    """A view into one guest.

    Subclasses set :attr:`memory` and :attr:`profile` and implement the vCPU methods. Virtual reads
    go through the guest's own page tables in :attr:`memory` unless a backend knows better.

    Attributes
    ----------
    memory : PhysicalMemory
        Guest physical memory.
    profile : KernelProfile or None
        Symbols and offsets of the guest kernel (needed for kernel reads and symbol lookups).
    """

    #: Short name: ``"qemu"``, ``"libvmi"``.
    name: str = "backend"
    memory: PhysicalMemory
    profile: Any

    _kernel: KernelView | None = None

    # -- memory ----------------------------------------------------------------------------------
    @property
    def kernel(self) -> KernelView:
        """The kernel objects of the guest (built on first use)."""
        if self._kernel is None:
            if self.profile is None:
                raise BackendError(f"the {self.name} backend has no kernel profile: kernel reads need one")
            self._kernel = KernelView(self.memory, self.profile)
        return self._kernel

    def read_pa(self, paddr: int, size: int) -> bytes:
        """``size`` bytes of guest physical memory at ``paddr``."""
        return self.memory.read(paddr, size)

    def read_va(self, vaddr: int, size: int, *, cr3: int | None = None, pid: int | None = None) -> bytes:
        """``size`` bytes at virtual address ``vaddr``.

        In the kernel's address space by default; in a process's with ``cr3`` (its page-table root)
        or ``pid`` (looked up in the task list; 0 means the kernel, as in LibVMI).
        """
        if cr3 is None and pid:
            cr3 = self.pid_to_dtb(pid)
        if cr3 is None:
            return self.kernel.read(vaddr, size)
        return self.kernel.read_user(cr3, vaddr, size)

    def pid_to_dtb(self, pid: int) -> int:
        """The page-table root (CR3) of process ``pid``."""
        for task in self.kernel.tasks(threads=True):
            if task.pid == pid:
                if task.cr3 is None:
                    raise BackendError(f"pid {pid} ({task.comm}) is a kernel thread: it has no user space")
                return task.cr3
        raise BackendError(f"no process with pid {pid} in the guest")

    def translate_ksym2v(self, symbol: str) -> int:
        """The virtual address of kernel symbol ``symbol``."""
        if self.profile is None:
            raise BackendError(f"the {self.name} backend has no kernel profile to look {symbol!r} up in")
        return int(self.profile.symbol(symbol))

    # -- vCPUs -----------------------------------------------------------------------------------
    @abstractmethod
    def get_vcpureg(self, name: str, vcpu: int = 0) -> int:
        """The value of register ``name`` (see :data:`REGISTERS`) of ``vcpu``."""

    @abstractmethod
    def pause(self) -> None:
        """Stop every vCPU."""

    @abstractmethod
    def resume(self) -> None:
        """Let the vCPUs run again."""

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Keep the guest stopped inside a ``with`` block (a consistent view for several reads)."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def close(self) -> None:
        """Release the hypervisor connection and the memory mapping."""
        self.memory.close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_register(name: str) -> str:
    """``name`` in lower case if it is a known register, else a :class:`BackendError`.

    >>> check_register("CR3")
    'cr3'
    >>> check_register("xmm0")
    Traceback (most recent call last):
    ...
    vims.collector.backends.base.BackendError: unknown register 'xmm0': one of rax, rbx, ...
    """
    low = name.lower()
    if low not in REGISTERS:
        raise BackendError(f"unknown register {name!r}: one of {', '.join(REGISTERS[:2])}, ...")
    return low
