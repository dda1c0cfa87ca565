"""Call sites: the user-space address a system call came from, as a token that survives ASLR.

A raw return address (``user_ip``, RCX at the syscall) changes from run to run with address-space
randomisation; its offset within the mapping it lies in does not. :class:`CallSites` reads the
process's memory mappings (VMAs) from guest memory and turns an address into
``<module>+0x<offset>``, the offset counted from the start of the mapped *file* (``vm_pgoff``
included), so ``libc.so.6+0x2a0f3`` names the same instruction in every process and every run.

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

from vims.collector.memory import GuestMemoryError
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


def walk_vmas(u64: Any, read_cstring: Any, mm: int, offsets: Any) -> list[Vma]:
    """The mappings of the address space ``mm``, by address, read with ``u64(vaddr)`` and
    ``read_cstring(vaddr, limit)`` on kernel memory (a :class:`~vims.collector.kernel.KernelView`'s)."""
    o = offsets
    root = u64(mm + o.mm_mt + o.ma_root)
    vma_addrs: list[int] = []
    stack = [root]
    nodes = 0
    while stack:
        entry = stack.pop()
        if entry & 3 != 2 or entry <= 4096:  # not a node: a lone entry (or nothing) at the root
            if entry and entry & 3 == 0:
                vma_addrs.append(entry)
            continue
        nodes += 1
        if nodes > MAX_NODES:
            raise GuestMemoryError(f"the maple tree of mm {mm:#x} has more than {MAX_NODES} nodes")
        node = entry & ~_NODE_MASK
        kind = (entry >> _TYPE_SHIFT) & _TYPE_MASK
        if kind not in o.slots:
            raise GuestMemoryError(f"maple node {node:#x} of unknown type {kind}")
        count, slot_off = o.slots[kind]
        slots = [u64(node + slot_off + 8 * i) for i in range(count)]
        if kind == MAPLE_LEAF_64:
            vma_addrs.extend(s for s in slots if s and s & 3 == 0)
        else:
            stack.extend(s for s in reversed(slots) if s)
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
        self.reason = ""
        self._cache: dict[int, tuple[list[int], list[Vma], float]] = {}
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

    def token(self, mm: int, ip: int) -> str:
        """The token of user address ``ip`` in the address space ``mm``."""
        if self._o is None or not mm:
            self.fallbacks += 1
            return page_token(ip)
        entry = self._cache.get(mm)
        for attempt in (0, 1):
            if entry is not None:
                starts, vmas, _ = entry
                i = bisect.bisect_right(starts, ip) - 1
                if i >= 0 and ip < vmas[i].end:
                    return vmas[i].token(ip)
            if attempt or (entry is not None and time.monotonic() - entry[2] < self.refresh_s):
                break
            try:
                vmas = self.vmas(mm)
            except GuestMemoryError:
                break
            if len(self._cache) > 4096:
                self._cache.clear()
            entry = self._cache[mm] = ([v.start for v in vmas], vmas, time.monotonic())
        self.fallbacks += 1
        return page_token(ip)

    def tokens(self, mms: Iterable[int], ips: Iterable[int]) -> list[str]:
        """:meth:`token` for pairs of address spaces and addresses."""
        return [self.token(mm, ip) for mm, ip in zip(mms, ips, strict=True)]
