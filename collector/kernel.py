"""Kernel objects read from guest memory: tasks, the current task of a vCPU, user-space strings.

A :class:`KernelView` combines guest physical memory with a kernel profile (symbol addresses and
structure member offsets, :mod:`vims.collector.profile`). It needs no vCPU: the kernel's own page
tables (``init_top_pgt``), the direct map base (``page_offset_base``) and the paging mode (5-level
when the direct map sits below ``0xffff800000000000``) are read from memory. So it works while
another client holds the GDB stub, and from a bare memory image.

Offsets are looked up once, at construction; the per-event calls a tracer makes
(:meth:`KernelView.current_task`, :meth:`KernelView.task`, :meth:`KernelView.read_user_string`)
are a handful of ``struct.unpack_from`` on the mapping each.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from vims.collector.memory import (
    PAGE_SIZE,
    START_KERNEL_MAP,
    AddressSpace,
    GuestMemoryError,
    KernelSpace,
    PhysicalMemory,
    image_paddr,
    pgd_base,
)
from vims.errors import VimsError

#: A loop in a kernel list (or memory changing under us) stops a walk after this many steps.
MAX_LIST = 1 << 16

#: Direct-map bases are above this with 4-level paging, below it with 5-level paging.
_LA57_LIMIT = 0xFFFF_8000_0000_0000


class Profile(Protocol):
    """What a :class:`KernelView` needs from a kernel profile (:class:`vims.collector.profile.KernelProfile`)."""

    release: str

    def symbol(self, name: str) -> int: ...
    def has_symbol(self, name: str) -> bool: ...
    def symbol_at(self, addr: int) -> tuple[str, int]: ...
    def offset(self, struct: str, member: str) -> int: ...
    def size(self, struct: str) -> int: ...


class ProfileError(VimsError):
    """The kernel profile lacks a symbol or member that a reader needs."""


@dataclass(frozen=True)
class Task:
    """One ``task_struct``.

    Attributes
    ----------
    addr : int
        Kernel virtual address of the ``task_struct``.
    pid, tgid : int
        Thread id and process id (``tgid``), as the guest's ``ps`` shows them.
    comm : str
        The 15-character command name.
    ppid : int
        Process id of the real parent (0 for ``init`` and ``kthreadd``).
    mm : int
        Address of the ``mm_struct``; 0 for kernel threads.
    cr3 : int or None
        Physical address of the page tables (``__pa(mm->pgd)``); None for kernel threads.
    exe : str or None
        Path of the executable (``mm->exe_file``), when asked for and present.
    """

    addr: int
    pid: int
    tgid: int
    comm: str
    ppid: int
    mm: int
    cr3: int | None
    exe: str | None = None

    @property
    def kernel_thread(self) -> bool:
        return self.mm == 0


class KernelView:
    """Read kernel objects of a guest from its physical memory.

    Parameters
    ----------
    memory : PhysicalMemory
        Guest physical memory (the mapped RAM file, or a backend's reader).
    profile : KernelProfile
        Symbols and structure offsets of the guest's kernel.
    phys_base : int, optional
        Physical load offset of the kernel image; read from the ``phys_base`` variable if omitted
        (0 with ``nokaslr`` on Debian's kernel).

    Examples
    --------
    With a running guest (not a doctest)::

        view = KernelView(PhysicalMemory.open(guest.memory_path), guest.profile)
        for task in view.tasks():
            print(task.pid, task.comm)
    """

    def __init__(self, memory: PhysicalMemory, profile: Any, phys_base: int | None = None) -> None:
        if getattr(profile, "relocatable", False):  # link-time symbols: find KASLR's offsets first
            from vims.collector.kaslr import relocate

            profile = relocate(memory, profile)
        self.memory = memory
        self.profile = profile
        kaslr = getattr(profile, "metadata", {}).get("kaslr") or {}
        if phys_base is None and "phys_base" in kaslr:
            phys_base = int(kaslr["phys_base"])
        self.phys_base = self._phys_base() if phys_base is None else phys_base
        pob = memory.u64(self._image_pa("page_offset_base"))
        if not pob >> 63:
            raise ProfileError(f"page_offset_base reads {pob:#x}, not a kernel address: the profile does "
                               "not belong to this guest's kernel (or the guest has not booted yet)")
        self.page_offset_base = pob
        self.la57 = pob < _LA57_LIMIT
        end = self._sym("_end") if profile.has_symbol("_end") else START_KERNEL_MAP + (1 << 30)
        self.kernel = KernelSpace(memory, self._image_pa("init_top_pgt"), self.la57, pob,
                                  self.phys_base, image_size=end - START_KERNEL_MAP)
        o = self._offsets = _Offsets(profile)
        self.init_task = self._sym("init_task")
        self._current_task = self._sym("current_task") if profile.has_symbol("current_task") else None
        self._spaces: dict[int, AddressSpace] = {}
        self._pti_built = profile.has_symbol("pti_init")
        self._u64 = self.kernel.u64
        self._task_list = o.tasks

    # -- helpers ---------------------------------------------------------------------------------
    def _sym(self, name: str) -> int:
        try:
            return int(self.profile.symbol(name))
        except (KeyError, LookupError, VimsError) as exc:
            raise ProfileError(f"the kernel profile has no symbol {name!r}") from exc

    def _image_pa(self, name: str) -> int:
        return image_paddr(self._sym(name), getattr(self, "phys_base", 0))

    def _phys_base(self) -> int:
        if not self.profile.has_symbol("phys_base"):
            return 0
        addr = self._sym("phys_base")
        value = self.memory.u64(image_paddr(addr, 0))
        # The variable holds its own correction: trust it only if reading through it agrees.
        if value and value % PAGE_SIZE == 0 and value < self.memory.end:
            try:
                if self.memory.u64(image_paddr(addr, value)) == value:
                    return value
            except GuestMemoryError:
                pass
        return 0

    def symbol_address(self, name: str) -> int:
        """The address of kernel symbol ``name`` (:class:`ProfileError` if the profile lacks it)."""
        return self._sym(name)

    def pa(self, vaddr: int) -> int:
        """The physical address of kernel virtual address ``vaddr``."""
        return self.kernel.translate(vaddr)

    def read(self, vaddr: int, size: int) -> bytes:
        """``size`` bytes of kernel memory at ``vaddr``."""
        return self.kernel.read(vaddr, size)

    def u64(self, vaddr: int) -> int:
        """The 64-bit word at kernel address ``vaddr``."""
        return self.kernel.u64(vaddr)

    def space(self, cr3: int) -> AddressSpace:
        """The address space whose page tables are at ``cr3`` (a process's, seen by the kernel)."""
        # PCID bits are not part of the address space, nor, on a kernel built for PTI (8 KiB top-level
        # tables), the user-copy bit 12
        cr3 = pgd_base(cr3) if self._pti_built else cr3 & ~0xFFF
        space = self._spaces.get(cr3)
        if space is None:
            if len(self._spaces) > 4096:
                self._spaces.clear()
            space = self._spaces[cr3] = self.kernel.for_process(cr3)
        return space

    def read_user(self, cr3: int, vaddr: int, size: int) -> bytes:
        """``size`` bytes at ``vaddr`` in the address space of ``cr3``."""
        return self.space(cr3).read(vaddr, size)

    def read_user_string(self, cr3: int, vaddr: int, limit: int = 4096) -> str:
        """The NUL-terminated string at user address ``vaddr`` of the process with page tables ``cr3``.

        Raises :class:`~vims.collector.memory.PageFaultError` if its first page is not present (not
        yet touched by the process, or swapped out).
        """
        return self.space(cr3).read_cstring(vaddr, limit).decode("utf-8", "surrogateescape")

    # -- tasks -----------------------------------------------------------------------------------
    def current_task(self, gs_base: int) -> int:
        """The ``task_struct`` address running on the vCPU whose kernel GS base is ``gs_base``.

        Kernel 6.1 keeps it in the per-cpu variable ``current_task``: the symbol's value is an
        offset into each CPU's per-cpu area, which GS points at in kernel mode.
        """
        if self._current_task is None:
            raise ProfileError("the kernel profile has no per-cpu symbol 'current_task' "
                               "(kernels from 6.2 keep it in pcpu_hot)")
        return self._u64(gs_base + self._current_task)

    @property
    def current_task_offset(self) -> int | None:
        """The per-cpu offset of ``current_task`` (added to a CPU's kernel GS base), None if unknown."""
        return self._current_task

    @property
    def task_id_offsets(self) -> tuple[int, int, int, int]:
        """The offsets of ``pid``, ``tgid``, ``comm`` and ``real_parent`` in ``task_struct``."""
        o = self._offsets
        return (o.pid, o.tgid, o.comm, o.real_parent)

    def per_cpu_base(self, cpu: int) -> int:
        """The per-cpu area of ``cpu`` (``__per_cpu_offset[cpu]``), for when no GS base is at hand."""
        return self._u64(self._sym("__per_cpu_offset") + 8 * cpu)

    def task_pid_comm(self, addr: int) -> tuple[int, str]:
        """The pid and comm of the task at ``addr`` (two reads: what tells a cached identity from a
        task whose memory was freed and reused, or that ran another program)."""
        o = self._offsets
        k = self.kernel
        return k.u32(addr + o.pid), k.read(addr + o.comm, 16).split(b"\0", 1)[0].decode("utf-8", "replace")

    def task(self, addr: int, *, exe: bool = False) -> Task:
        """The :class:`Task` at ``addr`` (``exe=True`` also resolves the executable's path)."""
        o = self._offsets
        k = self.kernel
        pid = k.u32(addr + o.pid)
        tgid = k.u32(addr + o.tgid)
        comm = k.read(addr + o.comm, 16).split(b"\0", 1)[0].decode("utf-8", "replace")
        parent = self._u64(addr + o.real_parent)
        ppid = k.u32(parent + o.tgid) if parent and parent != addr else 0
        mm = self._u64(addr + o.mm)
        cr3 = None
        path = None
        if mm:
            pgd = self._u64(mm + o.pgd)
            cr3 = k.translate(pgd)
            if exe:
                path = self.exe_path(mm)
        if pid == 0:
            ppid = 0
        return Task(addr, pid, tgid, comm, ppid, mm, cr3, path)

    def _list(self, head: int, member_offset: int) -> Iterator[int]:
        """The containers of a ``list_head`` list: ``head`` is the list head's address."""
        node = self._u64(head)
        seen = 0
        while node != head:
            yield node - member_offset
            node = self._u64(node)
            seen += 1
            if seen > MAX_LIST:
                raise GuestMemoryError(f"the kernel list at {head:#x} does not end (changed while read?)")

    def task_addresses(self, threads: bool = False) -> Iterator[int]:
        """Addresses of every process (thread-group leader) from ``init_task.tasks``, ``init_task`` first.

        With ``threads`` also every other thread of each process (``signal->thread_head``).
        """
        o = self._offsets
        for leader in (self.init_task, *self._list(self.init_task + o.tasks, o.tasks)):
            yield leader
            if threads and o.thread_node is not None and leader != self.init_task:
                signal = self._u64(leader + o.signal)
                if not signal:
                    continue
                for thread in self._list(signal + o.thread_head, o.thread_node):
                    if thread != leader:
                        yield thread

    def tasks(self, threads: bool = False, exe: bool = False) -> list[Task]:
        """The process list (``threads`` adds non-leader threads; ``exe`` resolves executables)."""
        return [self.task(addr, exe=exe) for addr in self.task_addresses(threads)]

    # -- files -----------------------------------------------------------------------------------
    def dentry_path(self, dentry: int) -> str:
        """The path of ``dentry`` up to the root of its file system."""
        o = self._offsets
        if o.d_parent is None or o.d_name_name is None:
            raise ProfileError("the kernel profile lacks dentry.d_parent or dentry.d_name")
        parts: list[str] = []
        for _ in range(256):
            parent = self._u64(dentry + o.d_parent)
            if not parent or parent == dentry:
                break
            name = self.kernel.read_cstring(self._u64(dentry + o.d_name_name), 256)
            parts.append(name.decode("utf-8", "surrogateescape"))
            dentry = parent
        return "/" + "/".join(reversed(parts))

    def exe_path(self, mm: int) -> str | None:
        """The path of the executable of the address space ``mm`` (None if it has none)."""
        o = self._offsets
        if o.exe_file is None or o.f_path_dentry is None:
            return None
        file = self._u64(mm + o.exe_file)
        if not file:
            return None
        return self.dentry_path(self._u64(file + o.f_path_dentry))

    def code_range(self, mm: int) -> tuple[int, int]:
        """``(start_code, end_code)`` of the address space ``mm``: the main executable's text."""
        o = self._offsets
        if o.start_code is None or o.end_code is None:
            raise ProfileError("the kernel profile lacks mm_struct.start_code or end_code")
        return self._u64(mm + o.start_code), self._u64(mm + o.end_code)


class _Offsets:
    """Every structure offset the readers use, looked up once (attribute access beats dict lookups)."""

    def __init__(self, profile: Any) -> None:
        def off(struct_name: str, member: str, required: bool = True) -> Any:
            try:
                return int(profile.offset(struct_name, member))
            except (KeyError, LookupError, VimsError) as exc:
                if required:
                    raise ProfileError(f"the kernel profile has no member {struct_name}.{member}") from exc
                return None

        self.tasks = off("task_struct", "tasks")
        self.pid = off("task_struct", "pid")
        self.tgid = off("task_struct", "tgid")
        self.comm = off("task_struct", "comm")
        self.real_parent = off("task_struct", "real_parent")
        self.mm = off("task_struct", "mm")
        self.signal = off("task_struct", "signal")
        self.pgd = off("mm_struct", "pgd")
        self.thread_node = off("task_struct", "thread_node", required=False)
        self.thread_head = off("signal_struct", "thread_head", required=False)
        if self.thread_head is None:
            self.thread_node = None
        self.exe_file = off("mm_struct", "exe_file", required=False)
        self.start_code = off("mm_struct", "start_code", required=False)
        self.end_code = off("mm_struct", "end_code", required=False)
        self.d_parent = off("dentry", "d_parent", required=False)
        d_name = off("dentry", "d_name", required=False)
        qstr_name = off("qstr", "name", required=False)
        self.d_name_name = None if d_name is None or qstr_name is None else d_name + qstr_name
        f_path = off("file", "f_path", required=False)
        path_dentry = off("path", "dentry", required=False)
        self.f_path_dentry = None if f_path is None or path_dentry is None else f_path + path_dentry
        if None in (self.d_parent, self.d_name_name, self.f_path_dentry):
            self.exe_file = None


def unpack_u64s(data: bytes) -> tuple[int, ...]:
    """The little-endian 64-bit words of ``data``.

    >>> unpack_u64s(bytes(8) + b"\\x01" + bytes(7))
    (0, 1)
    """
    return struct.unpack(f"<{len(data) // 8}Q", data[: len(data) // 8 * 8])
