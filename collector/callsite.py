"""Call sites: the user-space address a system call came from, as a token that survives ASLR.

A raw return address (``user_ip``, RCX at the syscall) changes from run to run with address-space
randomisation; its offset within the mapping it lies in does not. :class:`CallSites` reads the
process's memory mappings (VMAs) from guest memory and turns an address into
``<module>+0x<offset>``, the offset counted from the start of the mapped *file* (``vm_pgoff``
included), so ``libc.so.6+0x2a0f3`` names the same instruction in every process and every run.

On a dynamically linked program most calls are made inside libc, whose offset alone says which
wrapper made the call but not who called it. When the address lies outside the main program's text
and the user stack pointer at the call is known, the token gains the main program's call into the
library: ``libc.so.6+0xea1b2<nginx+0x3c2a1``, the first word of the user stack (searched over
:data:`STACK_WORDS` words) that points into the program's text (``mm->start_code``..``end_code``).
Without such a word the token is the library's alone. A call from the main program's own text (a
static program such as busybox) keeps the plain ``module+0xoffset`` token.

Kernel 6.1 keeps a process's VMAs in a maple tree (``mm->mm_mt``); :func:`walk_vmas` walks it
(internal ``maple_arange_64`` / ``maple_range_64`` nodes down to ``maple_leaf_64`` leaves whose
slots point at ``vm_area_struct``). Mappings without a file are ``[stack]``, ``[heap]``,
``[vdso]``, ``[vvar]`` or ``[anon]``, with the offset from the mapping's start.

When the VMAs cannot be read (no ``mm``, a profile without the maple-tree types, memory changing
under the walk), the token falls back to the page offset, ``?+0x<ip & 0xfff>``: still invariant
under ASLR (mappings are page aligned), but it no longer tells modules apart.

>>> page_token(0x7f3a12345abc)
'?+0xabc'
>>> site_pairs([257, 0], ["busybox+0x4f1a2", None])
['257@busybox+0x4f1a2', '0@?']
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vims.collector.kernel import unpack_u64s
from vims.collector.memory import PAGE_SIZE, GuestMemoryError
from vims.errors import VimsError

#: Maple tree node types (``enum maple_type``) and encoding (include/linux/maple_tree.h, 6.1).
MAPLE_DENSE, MAPLE_LEAF_64, MAPLE_RANGE_64, MAPLE_ARANGE_64 = 0, 1, 2, 3
_NODE_MASK = 0xFF
_TYPE_SHIFT, _TYPE_MASK = 3, 0x0F
#: Slots per node type, and where the slot array starts, when the profile does not say.
_SLOTS = {MAPLE_LEAF_64: (16, 128), MAPLE_RANGE_64: (16, 128), MAPLE_ARANGE_64: (10, 80)}
#: A walk stops after this many nodes (memory changing under us must not loop for ever).
MAX_NODES = 4096
#: Calls after which a process's mappings may have changed: its cache entry is dropped.
REMAP_CALLS = frozenset({9, 10, 11, 12, 25, 59, 322})  # mmap mprotect munmap brk mremap execve execveat
#: Words of the user stack searched for the main program's call into a library (1 KiB).
STACK_WORDS = 128


def page_token(ip: int) -> str:
    """The fallback token: the offset of ``ip`` in its page."""
    return f"?+{ip & 0xFFF:#x}"


def site_pairs(nrs: Sequence[int], sites: Sequence[str | None]) -> list[str]:
    """``nr@site`` tokens, the (system call, call site) pairs a model can use as its alphabet."""
    return [f"{nr}@{site or '?'}" for nr, site in zip(nrs, sites, strict=True)]


@dataclass(frozen=True)
class Vma:
    """One memory mapping of a process."""

    start: int
    end: int
    pgoff: int  # in pages: where in the file the mapping starts
    name: str  # file base name, or [stack], [heap], [vdso], [anon]
    file_backed: bool

    def token(self, ip: int) -> str:
        off = ip - self.start + (self.pgoff << 12 if self.file_backed else 0)
        return f"{self.name}+{off:#x}"


class _Offsets:
    def __init__(self, profile: Any) -> None:
        def off(struct: str, member: str, default: int | None = None) -> int:
            try:
                return int(profile.offset(struct, member))
            except (VimsError, KeyError, LookupError):
                if default is None:
                    raise
                return default

        self.mm_mt = off("mm_struct", "mm_mt")
        self.ma_root = off("maple_tree", "ma_root")
        self.slots = {
            MAPLE_LEAF_64: (16, off("maple_range_64", "slot", 128)),
            MAPLE_RANGE_64: (16, off("maple_range_64", "slot", 128)),
            MAPLE_ARANGE_64: (10, off("maple_arange_64", "slot", 80)),
        }
        self.vm_start = off("vm_area_struct", "vm_start")
        self.vm_end = off("vm_area_struct", "vm_end")
        self.vm_pgoff = off("vm_area_struct", "vm_pgoff")
        self.vm_file = off("vm_area_struct", "vm_file")
        self.dentry = off("file", "f_path") + off("path", "dentry")
        self.d_name = off("dentry", "d_name") + off("qstr", "name")
        self.start_stack = off("mm_struct", "start_stack")
        self.start_brk = off("mm_struct", "start_brk")
        self.brk = off("mm_struct", "brk")
        try:
            self.vdso: int | None = off("mm_struct", "context.vdso")
        except (VimsError, KeyError, LookupError):
            self.vdso = None


def _is_kernel_pointer(value: int) -> bool:
    """Whether ``value`` looks like a pointer into the kernel half (a slab object: a node or a VMA).

    Slots of a maple node also hold small values that are not pointers: the node's metadata
    (``end | gap << 8``) overlaps the last slot of a ``maple_range_64`` that is not full.
    """
    return value >> 63 == 1 and value & 7 == 0


def _vma_pointers(u64: Any, root: int, slot_layout: dict[int, tuple[int, int]]) -> list[int]:
    """The ``vm_area_struct`` pointers of the maple tree whose ``ma_root`` is ``root``.

    The root is a node when it carries ``MAPLE_ROOT_NODE`` (``root & 3 == 2``, above 4096), else a
    lone entry; every slot of an internal node is an encoded child (``node | type << 3 | 4``: the
    low bits are *not* 2), every slot of a leaf an entry.

    A root ``maple_arange_64`` whose first slot is a leaf (type 1) holding two VMAs and, in its
    last slot, the metadata ``end=12``:

    >>> K = 0xFFFF_8880_0000_0000
    >>> mem = {K + 0x100 + 80: K + 0x200 | 1 << 3 | 4, K + 0x200 + 128: K + 0x1000,
    ...        K + 0x200 + 136: K + 0x1098, K + 0x200 + 128 + 8 * 15: 12}
    >>> [hex(v - K) for v in _vma_pointers(lambda a: mem.get(a, 0), K + 0x100 | 3 << 3 | 4 | 2, _SLOTS)]
    ['0x1000', '0x1098']
    """
    if root & 3 != 2 or root <= 4096:
        return [root] if _is_kernel_pointer(root) else []
    found: list[int] = []
    stack = [root]
    nodes = 0
    while stack:
        entry = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise GuestMemoryError(f"the maple tree at {root:#x} has more than {MAX_NODES} nodes")
        node = entry & ~_NODE_MASK
        kind = (entry >> _TYPE_SHIFT) & _TYPE_MASK
        if kind not in slot_layout:
            raise GuestMemoryError(f"maple node {node:#x} of unknown type {kind}")
        count, slot_off = slot_layout[kind]
        slots = [u64(node + slot_off + 8 * i) for i in range(count)]
        if kind == MAPLE_LEAF_64:
            found.extend(s for s in slots if _is_kernel_pointer(s))
        else:
            stack.extend(s for s in reversed(slots) if _is_kernel_pointer(s & ~_NODE_MASK))
    return found


def walk_vmas(u64: Any, read_cstring: Any, mm: int, offsets: Any) -> list[Vma]:
    """The mappings of the address space ``mm``, by address, read with ``u64(vaddr)`` and
    ``read_cstring(vaddr, limit)`` on kernel memory (a :class:`~vims.collector.kernel.KernelView`'s)."""
    o = offsets
    vma_addrs = _vma_pointers(u64, u64(mm + o.mm_mt + o.ma_root), o.slots)
    vdso = u64(mm + o.vdso) if o.vdso is not None else 0
    start_stack, start_brk, brk = u64(mm + o.start_stack), u64(mm + o.start_brk), u64(mm + o.brk)
    vmas: dict[int, Vma] = {}
    for addr in vma_addrs:
        start, end = u64(addr + o.vm_start), u64(addr + o.vm_end)
        if not start < end:
            continue
        file = u64(addr + o.vm_file)
        if file:
            dentry = u64(file + o.dentry)
            raw = read_cstring(u64(dentry + o.d_name), 256) if dentry else b""
            name = raw.decode("utf-8", "replace") or "[file]"
        elif start <= start_stack < end:
            name = "[stack]"
        elif start_brk <= start < max(brk, start_brk + 1):
            name = "[heap]"
        elif vdso and start <= vdso < end:
            name = "[vdso]"
        elif vdso and end == vdso:
            name = "[vvar]"  # the vDSO's data pages sit right below it
        else:
            name = "[anon]"
        vmas[start] = Vma(start, end, u64(addr + o.vm_pgoff), name, bool(file))
    return [vmas[s] for s in sorted(vmas)]


class CallSites:
    """Tokens for user-space addresses, with each address space's mappings cached.

    Parameters
    ----------
    view : KernelView
        Reads the guest's kernel memory (:class:`vims.collector.kernel.KernelView`).
    refresh_s : float
        An address outside every cached mapping re-reads the mappings, at most this often per ``mm``.

    Attributes
    ----------
    mode : str
        ``"vma"`` when mappings are read, ``"page-offset"`` when the profile lacks the maple-tree
        layout (every token is then the fallback); :attr:`reason` says why.
    fallbacks : int
        Tokens that fell back to the page offset.
    """

    def __init__(self, view: Any, refresh_s: float = 0.05) -> None:
        self.view = view
        self.refresh_s = refresh_s
        self.fallbacks = 0
        self.walks = 0
        #: Tokens of a call outside the main program that gained a ``<caller`` part / looked for one.
        self.callers_found = 0
        self.callers_sought = 0
        self.reason = ""
        self._cache: dict[int, _Mappings] = {}
        try:
            self._o: _Offsets | None = _Offsets(view.profile)
            self.mode = "vma"
        except (VimsError, KeyError, LookupError) as exc:
            self._o = None
            self.mode = "page-offset"
            self.reason = f"no VMA layout in the kernel profile ({exc}): call sites are page offsets"
        self._u64 = view.u64
        self._cstr = view.kernel.read_cstring

    def vmas(self, mm: int) -> list[Vma]:
        """The mappings of address space ``mm`` (read now, not cached)."""
        if self._o is None:
            raise VimsError(self.reason)
        self.walks += 1
        return walk_vmas(self._u64, self._cstr, mm, self._o)

    def invalidate(self, mm: int) -> None:
        """Forget the mappings of ``mm`` (after mmap, munmap, execve, ...)."""
        self._cache.pop(mm, None)

    def _read(self, mm: int) -> _Mappings | None:
        try:
            vmas = self.vmas(mm)
        except GuestMemoryError:
            return None
        try:
            code = self.view.code_range(mm)
        except (VimsError, AttributeError):  # a profile without mm_struct.start_code: no callers
            code = (0, 0)
        if len(self._cache) > 4096:
            self._cache.clear()
        entry = self._cache[mm] = _Mappings([v.start for v in vmas], vmas, time.monotonic(), code)
        return entry

    def _lookup(self, mm: int, ip: int) -> tuple[Vma | None, _Mappings | None]:
        """The mapping ``ip`` lies in (re-reading the mappings once if it is in none), and the mappings."""
        entry = self._cache.get(mm)
        for attempt in (0, 1):
            if entry is not None:
                i = bisect.bisect_right(entry.starts, ip) - 1
                if i >= 0 and ip < entry.vmas[i].end:
                    return entry.vmas[i], entry
            if attempt or (entry is not None and time.monotonic() - entry.read_at < self.refresh_s):
                break
            entry = self._read(mm)
        return None, entry

    def token(self, mm: int, ip: int, sp: int = 0, cr3: int | None = None) -> str:
        """The token of user address ``ip`` in the address space ``mm``.

        With the user stack pointer ``sp`` at the call and the address space's ``cr3``, a call made
        outside the main program's text (in libc, mostly) gets the caller in the main program:
        ``libc.so.6+0xea1b2<nginx+0x3c2a1`` (see :meth:`caller`).
        """
        if self._o is None or not mm:
            self.fallbacks += 1
            return page_token(ip)
        vma, entry = self._lookup(mm, ip)
        if vma is None or entry is None:
            self.fallbacks += 1
            return page_token(ip)
        site = vma.token(ip)
        lo, hi = entry.code
        if sp and cr3 is not None and lo < hi and not lo <= ip < hi:
            caller = self.caller(entry, cr3, sp)
            if caller is not None:
                site = f"{site}<{caller}"
        return site

    def caller(self, entry: _Mappings, cr3: int, sp: int) -> str | None:
        """The token of the first of :data:`STACK_WORDS` words on the user stack at ``sp`` that points
        into the main program's text (``mm->start_code``..``end_code``), or None.

        At the ``syscall`` instruction the stack holds the return addresses of the library frames
        above it; the first one back in the main program names the program's call into the library.
        It is a heuristic (a stale word in a library frame can come first), cheap enough for every
        call: one or two page translations and a scan.
        """
        self.callers_sought += 1
        lo, hi = entry.code
        space = self.view.space(cr3)
        addr, end = sp, sp + 8 * STACK_WORDS
        while addr < end:
            n = min(end - addr, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            try:
                words = unpack_u64s(space.read(addr, n))
            except GuestMemoryError:
                return None  # the top of the stack (or a page not present): none found
            for word in words:
                if lo <= word < hi:
                    i = bisect.bisect_right(entry.starts, word) - 1
                    if i >= 0 and word < entry.vmas[i].end:
                        self.callers_found += 1
                        return entry.vmas[i].token(word)
            addr += n
        return None

    def tokens(self, mms: Iterable[int], ips: Iterable[int]) -> list[str]:
        """:meth:`token` for pairs of address spaces and addresses (no callers)."""
        return [self.token(mm, ip) for mm, ip in zip(mms, ips, strict=True)]


@dataclass
class _Mappings:
    """One address space's mappings as cached: their starts (for bisection), the mappings, when they
    were read, and the main program's text range (``(0, 0)`` when unknown)."""

    starts: list[int]
    vmas: list[Vma]
    read_at: float
    code: tuple[int, int]
