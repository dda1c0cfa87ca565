"""Guest memory seen from outside: physical reads and x86-64 address translation.

On QEMU the guest's RAM is a shared memory-backend file; :meth:`PhysicalMemory.open` maps it
read-only, so a read is a slice of the mapping (nanoseconds), not a GDB packet. Virtual addresses are
translated by walking the guest's own page tables in that memory, 4-level or 5-level (CR4.LA57), with
2 MiB and 1 GiB pages. Reads never write to the guest.

>>> import struct
>>> ram = bytearray(0x10000)
>>> cr3 = 0x1000                                    # PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000
>>> struct.pack_into("<Q", ram, cr3, 0x2000 | 0x3)            # PML4[0] -> PDPT, present
>>> struct.pack_into("<Q", ram, 0x2000, 0x3000 | 0x3)         # PDPT[0] -> PD
>>> struct.pack_into("<Q", ram, 0x3000 + 8, 0x0 | 0x83)       # PD[1]: 2 MiB page at physical 0
>>> space = AddressSpace(PhysicalMemory(bytes(ram)), cr3)
>>> hex(space.translate(0x200000 + 0x1234))
'0x1234'
>>> space.translate(0x400000)
Traceback (most recent call last):
...
vims.collector.memory.PageFaultError: virtual address 0x400000 is not mapped (PD entry not present, ...)
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vims.errors import MissingDependencyError, VimsError

PAGE_SIZE = 0x1000
PAGE_MASK = ~(PAGE_SIZE - 1)

#: Bits 12..51 of a page-table entry or of CR3: the physical frame.
_FRAME = 0x000F_FFFF_FFFF_F000
_PRESENT = 1 << 0
_PAGE_SIZE_BIT = 1 << 7  # PS: this PDPT/PD entry maps a 1 GiB / 2 MiB page
_LARGE_FRAME = {1 << 30: 0x000F_FFFF_C000_0000, 1 << 21: 0x000F_FFFF_FFE0_0000}

#: CR3 bit 12 selects the user copy of the top-level table under PTI (``PTI_USER_PGTABLE_BIT``).
PTI_USER_BIT = 1 << 12

#: Where the kernel image is mapped (``__START_KERNEL_map``); fixed on x86-64, also under KASLR.
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")

_LEVEL_NAMES = ("PT", "PD", "PDPT", "PML4", "PML5")

#: What a :class:`PhysicalMemory` can sit on.
Buffer = bytes | bytearray | memoryview | mmap.mmap


class GuestMemoryError(VimsError):
    """A read of guest memory that cannot be done."""


class PhysicalAddressError(GuestMemoryError):
    """A physical address outside the guest's RAM."""


class PageFaultError(GuestMemoryError):
    """A virtual address that the page tables do not map (what the CPU would fault on).

    Attributes: ``vaddr``, ``level`` (name of the table whose entry was not present, or
    ``"canonical"``), ``cr3``.
    """

    def __init__(self, vaddr: int, level: str, cr3: int) -> None:
        self.vaddr, self.level, self.cr3 = vaddr, level, cr3
        if level == "canonical":
            what = "is not canonical"
        else:
            what = f"is not mapped ({level} entry not present, cr3 {cr3:#x})"
        super().__init__(f"virtual address {vaddr:#x} {what}")


@dataclass(frozen=True)
class Region:
    """A run of guest physical addresses stored contiguously in the RAM file."""

    paddr: int
    offset: int
    size: int


def qemu_x86_regions(ram_size: int, machine: str = "pc") -> list[Region]:
    """The physical layout QEMU gives a RAM file of ``ram_size`` bytes on an x86 machine.

    Below 4 GiB QEMU keeps a hole for devices; RAM beyond the low part continues at 4 GiB while
    the file continues right after the low part.

    >>> qemu_x86_regions(256 << 20)
    [Region(paddr=0, offset=0, size=268435456)]
    >>> [hex(r.paddr) for r in qemu_x86_regions(4 << 30, "q35")]
    ['0x0', '0x100000000']
    """
    if machine.startswith("q35"):
        low = 0x8000_0000 if ram_size >= 0xB000_0000 else ram_size
    else:
        low = 0xC000_0000 if ram_size >= 0xE000_0000 else ram_size
    regions = [Region(0, 0, low)]
    if ram_size > low:
        regions.append(Region(1 << 32, low, ram_size - low))
    return regions


class PhysicalMemory:
    """Guest physical memory over a buffer: a read-only mapping of the RAM file or plain bytes.

    Parameters
    ----------
    buffer : bytes-like
        The RAM contents. :meth:`open` maps a QEMU memory-backend file read-only.
    regions : sequence of Region, optional
        Where each physical range lives in ``buffer``; by default physical address = offset.

    >>> mem = PhysicalMemory(b"abc\\0def")
    >>> mem.read(1, 2), mem.read_cstring(4), len(mem)
    (b'bc', b'def', 7)
    >>> mem.read(6, 4)
    Traceback (most recent call last):
    ...
    vims.collector.memory.PhysicalAddressError: physical range 0x6..0xa is outside guest RAM (7 bytes)
    """

    def __init__(self, buffer: Buffer, regions: Sequence[Region] | None = None) -> None:
        self._buf = buffer
        self._view = memoryview(buffer).cast("B")
        self.size = len(self._view)
        self._regions = list(regions) if regions is not None else [Region(0, 0, self.size)]
        # The common case (one region at 0) skips the region search on every read.
        self._identity = len(self._regions) == 1 and self._regions[0].paddr == self._regions[0].offset == 0
        self._limit = self._regions[0].size if self._identity else 0
        self._map: mmap.mmap | None = buffer if isinstance(buffer, mmap.mmap) else None
        #: One past the highest physical address backed by RAM.
        self.end = max(r.paddr + r.size for r in self._regions)

    @classmethod
    def open(cls, path: str | Path, machine: str = "pc") -> PhysicalMemory:
        """Map the RAM file ``path`` read-only (the guest keeps running and writing it)."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise MissingDependencyError(f"cannot open the guest memory file: {exc.strerror}; "
                                         "is the guest running (`vims guest up`)?", where=path) from exc
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise MissingDependencyError("the guest memory file is empty", where=path)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(mapping, qemu_x86_regions(size, machine))

    def close(self) -> None:
        """Release the mapping (reads afterwards fail)."""
        self._view.release()
        if self._map is not None:
            self._map.close()

    def __enter__(self) -> PhysicalMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.size

    def offset(self, paddr: int, size: int = 1) -> int:
        """The buffer offset of ``size`` bytes at ``paddr``, which must lie in one region."""
        if self._identity:
            if paddr >= 0 and paddr + size <= self._limit:
                return paddr
        else:
            for r in self._regions:
                if r.paddr <= paddr and paddr + size <= r.paddr + r.size:
                    return r.offset + paddr - r.paddr
        raise PhysicalAddressError(f"physical range {paddr:#x}..{paddr + size:#x} is outside guest RAM "
                                   f"({self.size} bytes)")

    def read(self, paddr: int, size: int) -> bytes:
        """``size`` bytes at physical address ``paddr``."""
        off = self.offset(paddr, size)
        return bytes(self._view[off:off + size])

    def view(self, paddr: int, size: int) -> memoryview:
        """A zero-copy view of ``size`` bytes at ``paddr`` (valid while the memory is open)."""
        off = self.offset(paddr, size)
        return self._view[off:off + size]

    def u64(self, paddr: int) -> int:
        """The little-endian 64-bit word at ``paddr``."""
        return _U64.unpack_from(self._view, self.offset(paddr, 8))[0]

    def u32(self, paddr: int) -> int:
        """The little-endian 32-bit word at ``paddr``."""
        return _U32.unpack_from(self._view, self.offset(paddr, 4))[0]

    @property
    def regions(self) -> list[Region]:
        """The physical ranges backed by RAM."""
        return list(self._regions)

    def find(self, needle: bytes, start: int, end: int) -> int:
        """The lowest physical address in ``[start, end)`` (one region) where ``needle`` starts, or -1."""
        for r in self._regions:
            lo, hi = max(start, r.paddr), min(end, r.paddr + r.size)
            if lo >= hi:
                continue
            finder = getattr(self._buf, "find", None)
            if finder is None:
                raise GuestMemoryError("this guest memory cannot be searched")
            at = int(finder(needle, r.offset + lo - r.paddr, r.offset + hi - r.paddr))
            if at >= 0:
                return at - r.offset + r.paddr
        return -1

    def read_cstring(self, paddr: int, limit: int = 4096) -> bytes:
        """The NUL-terminated string at ``paddr`` (without the NUL), at most ``limit`` bytes."""
        off = self.offset(paddr)
        end = min(off + limit, self.size)
        chunk = bytes(self._view[off:end])
        nul = chunk.find(b"\0")
        return chunk if nul < 0 else chunk[:nul]


class AddressSpace:
    """One virtual address space of the guest: the page tables rooted at ``cr3``.

    Parameters
    ----------
    memory : PhysicalMemory
        Guest physical memory holding the page tables.
    cr3 : int
        The CR3 value (flag and PCID bits are ignored).
    la57 : bool, default False
        5-level paging (CR4.LA57): a PML5 above the PML4, 57-bit virtual addresses.
    """

    def __init__(self, memory: PhysicalMemory, cr3: int, la57: bool = False) -> None:
        self.memory = memory
        self.cr3 = cr3
        self.la57 = la57
        self._root = cr3 & _FRAME
        self._levels = 5 if la57 else 4
        self._vbits = 57 if la57 else 48

    def __repr__(self) -> str:
        return f"AddressSpace(cr3={self.cr3:#x}, la57={self.la57})"

    def canonical(self, vaddr: int) -> bool:
        """Whether ``vaddr`` is canonical (its high bits copy the top translated bit)."""
        top = vaddr >> (self._vbits - 1)
        return top == 0 or top == (1 << (64 - self._vbits + 1)) - 1

    def walk(self, vaddr: int) -> tuple[int, int]:
        """Translate ``vaddr``: its physical address and the size of the page that maps it."""
        if not self.canonical(vaddr):
            raise PageFaultError(vaddr, "canonical", self.cr3)
        mem = self.memory
        table = self._root
        for level in range(self._levels - 1, -1, -1):
            shift = 12 + 9 * level
            entry = mem.u64(table + ((vaddr >> shift) & 0x1FF) * 8)
            if not entry & _PRESENT:
                raise PageFaultError(vaddr, _LEVEL_NAMES[level], self.cr3)
            if level in (1, 2) and entry & _PAGE_SIZE_BIT:
                size = 1 << shift
                return (entry & _LARGE_FRAME[size]) | (vaddr & (size - 1)), size
            table = entry & _FRAME
        return table | (vaddr & 0xFFF), PAGE_SIZE

    def translate(self, vaddr: int) -> int:
        """The physical address of ``vaddr``; :class:`PageFaultError` if it is not mapped."""
        return self.walk(vaddr)[0]

    def is_mapped(self, vaddr: int) -> bool:
        """Whether ``vaddr`` is mapped to a physical address inside guest RAM."""
        try:
            self.memory.offset(self.walk(vaddr)[0])
        except GuestMemoryError:
            return False
        return True

    def chunks(self, vaddr: int, size: int) -> Iterator[tuple[int, int, int]]:
        """Split ``size`` bytes at ``vaddr`` into physically contiguous pieces ``(vaddr, paddr, n)``."""
        end = vaddr + size
        while vaddr < end:
            paddr, page = self.walk(vaddr)
            n = min(end - vaddr, page - (vaddr & (page - 1)))
            yield vaddr, paddr, n
            vaddr += n

    def read(self, vaddr: int, size: int) -> bytes:
        """``size`` bytes at ``vaddr``, across pages; :class:`PageFaultError` if any page is unmapped."""
        mem = self.memory
        if size <= PAGE_SIZE - (vaddr & 0xFFF):  # the common case: inside one page
            return mem.read(self.walk(vaddr)[0], size)
        return b"".join(mem.read(p, n) for _, p, n in self.chunks(vaddr, size))

    def u64(self, vaddr: int) -> int:
        """The 64-bit word at ``vaddr``."""
        if vaddr & 0xFFF <= PAGE_SIZE - 8:
            return self.memory.u64(self.walk(vaddr)[0])
        return _U64.unpack(self.read(vaddr, 8))[0]

    def u32(self, vaddr: int) -> int:
        """The 32-bit word at ``vaddr``."""
        if vaddr & 0xFFF <= PAGE_SIZE - 4:
            return self.memory.u32(self.walk(vaddr)[0])
        return _U32.unpack(self.read(vaddr, 4))[0]

    def read_cstring(self, vaddr: int, limit: int = 4096) -> bytes:
        """The NUL-terminated string at ``vaddr`` (without the NUL), at most ``limit`` bytes.

        The string may cross pages; it ends early (without error) at the first unmapped page
        after its first byte.
        """
        parts: list[bytes] = []
        total = 0
        while total < limit:
            try:
                paddr = self.walk(vaddr)[0]
            except PageFaultError:
                if not parts:
                    raise
                break
            n = min(limit - total, PAGE_SIZE - (vaddr & 0xFFF))
            chunk = self.memory.read(paddr, n)
            nul = chunk.find(b"\0")
            if nul >= 0:
                parts.append(chunk[:nul])
                break
            parts.append(chunk)
            total += n
            vaddr += n
        return b"".join(parts)


class KernelSpace(AddressSpace):
    """The kernel half of the address space, with shortcuts that skip the page walk.

    The kernel image (``__START_KERNEL_map`` + physical offset ``phys_base``) and the direct map of
    all RAM (``page_offset_base``) are linear: their addresses translate by a subtraction. Other
    kernel addresses (vmalloc, modules, fixmap) and user addresses go through the page tables.

    Parameters
    ----------
    memory : PhysicalMemory
    cr3 : int
        A CR3 whose tables map the kernel (any process's, with ``pti=off``, or ``init_top_pgt``).
    la57 : bool
    page_offset_base : int
        Start of the direct map (``0xffff888000000000`` with 4 levels and ``nokaslr``).
    phys_base : int, default 0
        Physical address the kernel image was loaded at, minus its link-time address.
    image_size : int, default 1 GiB
        Length of the kernel image mapping.
    """

    def __init__(self, memory: PhysicalMemory, cr3: int, la57: bool, page_offset_base: int,
                 phys_base: int = 0, image_size: int = 1 << 30) -> None:
        super().__init__(memory, cr3, la57)
        self.page_offset_base = page_offset_base
        self.phys_base = phys_base
        self.image_size = image_size
        self._direct_end = page_offset_base + memory.end

    def walk(self, vaddr: int) -> tuple[int, int]:
        if START_KERNEL_MAP <= vaddr < START_KERNEL_MAP + self.image_size:
            return vaddr - START_KERNEL_MAP + self.phys_base, PAGE_SIZE
        if self.page_offset_base <= vaddr < self._direct_end:
            return vaddr - self.page_offset_base, PAGE_SIZE
        return super().walk(vaddr)

    def for_process(self, cr3: int) -> AddressSpace:
        """The address space of the process whose page tables are at ``cr3``."""
        return AddressSpace(self.memory, cr3, self.la57)


def pgd_base(cr3: int) -> int:
    """The kernel's top-level page table of a CR3 value: PCID (bits 0-11) and PTI's bit 12 cleared.

    A kernel built with ``CONFIG_PAGE_TABLE_ISOLATION`` (Debian's) allocates every top-level table
    as 8 KiB, aligned to 8 KiB: the kernel copy first, the user copy (CR3 bit 12 set) after it,
    whether PTI is on at run time or not. Both copies map user space alike, so the kernel copy
    serves user reads and identifies the process. Not for a kernel without that option.

    >>> hex(pgd_base(0x1234_5000 | 0x1000 | 0x5)), hex(pgd_base(0x1234_4000))
    ('0x12344000', '0x12344000')
    """
    return cr3 & _FRAME & ~PTI_USER_BIT


def image_paddr(vaddr: int, phys_base: int = 0) -> int:
    """The physical address of a kernel-image address (``__pa_symbol``).

    >>> hex(image_paddr(0xffffffff81000000))
    '0x1000000'
    """
    return vaddr - START_KERNEL_MAP + phys_base


def read_i32(data: Buffer, offset: int) -> int:
    """The signed 32-bit integer at ``offset`` of ``data`` (relative references in kernel tables)."""
    return _I32.unpack_from(data, offset)[0]


class ReaderMemory(PhysicalMemory):
    """Guest physical memory read through a function, for memory that cannot be mapped here (LibVMI,
    another process's RAM: :meth:`of_process`).

    Parameters
    ----------
    read : callable
        ``read(offset, size) -> bytes``, ``offset`` being where :class:`Region` ``regions`` put the
        physical address (by default the physical address itself); it raises or returns fewer bytes
        for what it cannot read.
    size : int
        The guest's RAM size in bytes (physical addresses ``0..size`` without ``regions``).
    regions : sequence of Region, optional
        Where each physical range lives for ``read``.

    >>> ram = bytes(range(16))
    >>> mem = ReaderMemory(lambda pa, n: ram[pa:pa + n], 16)
    >>> mem.read(2, 3), hex(mem.u32(0)), mem.find(bytes([9, 10]), 0, 16)
    (b'\\x02\\x03\\x04', '0x3020100', 9)
    """

    #: Bytes read at once when searching.
    SEARCH_CHUNK = 16 << 20

    def __init__(self, read: Callable[[int, int], bytes], size: int, regions: Sequence[Region] | None = None) -> None:
        self._read = read
        self.size = size
        self._regions = list(regions) if regions is not None else [Region(0, 0, size)]
        self._identity = len(self._regions) == 1 and self._regions[0].paddr == self._regions[0].offset == 0
        self._limit = self._regions[0].size if self._identity else 0
        self.end = max(r.paddr + r.size for r in self._regions)
        self._map = None
        self._fd: int | None = None  # a file this memory reads and closes (of_process)

    @classmethod
    def of_process(cls, pid: int, regions: Sequence[Region]) -> ReaderMemory:
        """The RAM of a running QEMU, read from ``/proc/PID/mem`` (``regions``: physical ranges at their
        host addresses in QEMU's process, e.g. from the monitor's ``gpa2hva``). Needs root or ptrace
        rights over the process; nothing is mapped or written."""
        path = f"/proc/{pid}/mem"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise MissingDependencyError(f"cannot open {path}: {exc.strerror} (reading another process's "
                                         "memory needs root, or ptrace rights over QEMU)") from None
        memory = cls(lambda offset, n: os.pread(fd, n, offset), sum(r.size for r in regions), regions)
        memory._fd = fd
        return memory

    def find(self, needle: bytes, start: int, end: int) -> int:
        """The lowest physical address in ``[start, end)`` where ``needle`` starts, or -1 (chunked reads)."""
        for r in self._regions:
            lo, hi = max(start, r.paddr), min(end, r.paddr + r.size)
            while lo < hi:
                n = min(self.SEARCH_CHUNK + len(needle) - 1, hi - lo)
                at = self.read(lo, n).find(needle)
                if at >= 0:
                    return lo + at
                lo += self.SEARCH_CHUNK
        return -1

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def read(self, paddr: int, size: int) -> bytes:
        offset = self.offset(paddr, size)
        try:
            data = self._read(offset, size)
        except GuestMemoryError:
            raise
        except Exception as exc:  # the backend's own error type, whatever it is
            raise PhysicalAddressError(f"cannot read physical range {paddr:#x}..{paddr + size:#x}: "
                                       f"{exc}") from exc
        if len(data) != size:
            raise PhysicalAddressError(f"short read at physical {paddr:#x}: {len(data)} of {size} bytes")
        return data

    def view(self, paddr: int, size: int) -> memoryview:
        return memoryview(self.read(paddr, size))

    def u64(self, paddr: int) -> int:
        return _U64.unpack(self.read(paddr, 8))[0]

    def u32(self, paddr: int) -> int:
        return _U32.unpack(self.read(paddr, 4))[0]

    def read_cstring(self, paddr: int, limit: int = 4096) -> bytes:
        out = b""
        while len(out) < limit:
            n = min(limit - len(out), PAGE_SIZE - (paddr & 0xFFF))
            chunk = self.read(paddr, n)
            nul = chunk.find(b"\0")
            if nul >= 0:
                return out + chunk[:nul]
            out += chunk
            paddr += n
        return out
