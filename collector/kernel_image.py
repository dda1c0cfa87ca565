"""The x86-64 kernel image as the boot loader leaves it: ELF segments, KASLR relocations, patch sites.

Debian's ``vmlinuz`` is a bzImage whose compressed payload (:func:`vims.collector.btf.extract_vmlinux`)
is ``vmlinux`` stripped of symbols but with its section headers, followed by the relocation table
the decompressor applies for KASLR (``arch/x86/tools/relocs``; verified on 6.1.0-57-amd64: 76,906
32-bit, 8,385 inverse 32-bit and 137,699 64-bit entries fill the 891,972 bytes after the ELF
exactly). Read backwards from the end of the payload, the table is: 32-bit entries up to a zero,
inverse 32-bit entries up to a zero, 64-bit entries up to a zero; each entry is the link-time
virtual address of a field (32 bits, sign-extended) that gets the virtual offset added (subtracted
for the inverse ones). :meth:`KernelImage.loaded` gives the image relocated to an offset.

The kernel then patches its own text at boot and at run time; the sites where it may do so are
listed in the image, and :class:`KernelImage` reads them (as offsets from the link-time ``_text``):

- ``.altinstructions``: ``struct alt_instr`` (6.1: ``s32 instr_offset, s32 repl_offset, u16 cpuid,
  u8 instrlen, u8 replacementlen``, 12 bytes, packed);
- ``.parainstructions``: ``struct paravirt_patch_site`` (``u8 *instr, u8 type, u8 len``, 16 bytes);
- ``.retpoline_sites``, ``.return_sites``, ``.smp_locks``: ``s32`` self-relative addresses;
- ``__jump_table`` (in ``.data``): ``struct jump_entry`` (``s32 code, s32 target, long key``);
- ``.static_call_sites`` (in ``.data``): ``struct static_call_site`` (``s32 addr, s32 key``; the
  key's low two bits are flags, 1 = tail call);
- ``__mcount_loc`` (in ``.init.data``): the absolute addresses of the ftrace call sites.

``.ibt_endbr_seal`` is absent from Debian's 6.1 (no ``CONFIG_X86_KERNEL_IBT``).

:class:`PatchSites` tells a change the kernel made from any other: a changed byte passes only if a
site covers it whose bytes now are a state the kernel's own patching code can write there. Measured
on Debian 6.1.0-57-amd64 booted with KASLR under QEMU 7.2 (``max`` and ``qemu64``): 472,448 bytes
of the 14 MiB text differ from the relocated image, in about 96,000 sites, and every one of them is
accounted for. The states accepted, by kind:

- ftrace sites: ``call __fentry__`` (as built), a 5-byte NOP, or a call to ``ftrace_caller`` or
  ``ftrace_regs_caller`` (a call into a dynamically allocated ftrace trampoline fails);
- return sites: the built ``jmp __x86_return_thunk``, ``ret`` and INT3s, or a jump to the thunk
  ``x86_return_thunk`` points to now;
- retpoline sites: the built call/jump to ``__x86_indirect_thunk_REG``, or ``[lfence;] call/jmp *%REG``
  padded with NOPs (the patched forms of conditional jumps to a thunk are not accepted);
- ``lock`` prefixes: ``lock`` or ``ds`` (a kernel running on one CPU);
- jump labels: a NOP of the site's built size, or a jump of that size to the entry's target;
- static calls and their ``__SCT__`` trampolines: a call (a jump, for tail calls and trampolines) to
  the function the key (``__SCK__``) holds now, a 5-byte NOP, ``ret`` and INT3s, ``xor %eax,%eax``
  for ``__static_call_return0``, or a jump to the return thunk;
- paravirt sites: a call to the operation ``pv_ops`` holds now, NOPs for ``_paravirt_nop``, ``ud2``
  for a missing one, each NOP-padded;
- alternatives: one of the site's replacements as ``apply_alternatives`` copies it (a leading
  ``call``/``jmp`` re-targeted, a ``jmp`` shortened when it fits), then NOPs; or the original, whose
  0x90 padding may have become long NOPs (changes inside the original are then left to the other
  kinds: a paravirt or return site in it).

Where the check trusts the guest: the current targets of static calls, paravirt operations and the
return thunk are read from kernel data (a rootkit that rewrites a key and its call sites together
passes here; the data are not kernel text). Alternatives are also checked against each other: every
site, changed or not, says which CPU features the kernel found (the replacement it holds was
selected, those after it were not), and a site whose choice contradicts the other sites of a feature
fails, even when its bytes are the image's own (a ``clac`` put back to the built NOPs). What the CPU
offers is not known otherwise: a forged choice made at every site of a feature at once passes. No
byte of the text is masked: every changed byte is checked against its site's states.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from vims.collector.btf import extract_vmlinux
from vims.collector.memory import START_KERNEL_MAP
from vims.errors import InputError
from vims.paths import cache_dir

__all__ = ["KernelImage", "Relocations", "Section", "parse_relocations"]

#: Where the kernel is linked to load (``CONFIG_PHYSICAL_START``): link VA ``START_KERNEL_MAP + this``.
LOAD_PHYSICAL_ADDR = 0x1000000

_ALT = np.dtype([("instr", "<i4"), ("repl", "<i4"), ("cpuid", "<u2"), ("instrlen", "u1"), ("repllen", "u1")])
_PARA = np.dtype([("instr", "<u8"), ("type", "u1"), ("len", "u1"), ("pad", "V6")])
_JUMP = np.dtype([("code", "<i4"), ("target", "<i4"), ("key", "<i8")])
_SCALL = np.dtype([("addr", "<i4"), ("key", "<i4")])


@dataclass(frozen=True)
class Section:
    """One ELF section header: ``name``, link-time ``addr``, file ``offset`` and ``size``."""

    name: str
    addr: int
    offset: int
    size: int


@dataclass(frozen=True)
class Relocations:
    """The KASLR relocation table: link-time addresses of 32-bit, inverse 32-bit and 64-bit fields."""

    r32: np.ndarray
    inverse32: np.ndarray
    r64: np.ndarray


def _sections(elf: bytes) -> tuple[list[Section], int]:
    """The section headers of a 64-bit ELF file, and where the file ends (the end of its headers)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise InputError("not a 64-bit little-endian ELF file", where="vmlinux")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if not shoff or not shnum:
        raise InputError("the kernel ELF file has no section headers", where="vmlinux")
    heads = []
    for i in range(shnum):
        base = shoff + i * shentsize
        name = struct.unpack_from("<I", elf, base)[0]
        addr, offset, size = struct.unpack_from("<QQQ", elf, base + 0x10)
        heads.append((name, addr, offset, size))
    strtab = heads[shstrndx]
    names = elf[strtab[2]:strtab[2] + strtab[3]]
    out = [Section(names[n:names.find(b"\0", n)].decode("latin-1"), a, o, s) for n, a, o, s in heads]
    return out, shoff + shnum * shentsize


def parse_relocations(tail: bytes) -> Relocations:
    """The relocation table appended to the decompressed kernel (read from its end backwards).

    >>> t = struct.pack("<7I", 0, 0x81000010, 0, 0x81000020, 0, 0x81000008, 0x81000004)
    >>> r = parse_relocations(t)
    >>> [hex(a) for a in r.r32], [hex(a) for a in r.inverse32], [hex(a) for a in r.r64]
    (['0xffffffff81000004', '0xffffffff81000008'], ['0xffffffff81000020'], ['0xffffffff81000010'])
    """
    words = np.frombuffer(tail[: len(tail) // 4 * 4], "<u4")[::-1]
    zeros = np.flatnonzero(words == 0)
    if len(zeros) < 3:
        raise InputError("no KASLR relocation table after the kernel ELF file", where="vmlinux")
    parts = np.split(words, zeros[:3])[:3]
    r32, inv, r64 = (p[p != 0].astype(np.int32).astype(np.int64).astype(np.uint64) for p in parts)
    return Relocations(np.sort(r32), np.sort(inv), np.sort(r64))


def _add32(buf: np.ndarray, at: np.ndarray, delta: int) -> None:
    """Add ``delta`` (mod 2**32) to the little-endian u32 fields at byte indexes ``at`` of ``buf``."""
    idx = at[:, None] + np.arange(4)
    val = (buf[idx].astype(np.uint64) << (8 * np.arange(4, dtype=np.uint64))).sum(axis=1)
    val = (val + np.uint64(delta % 2**32)) & np.uint64(0xFFFFFFFF)
    buf[idx] = ((val[:, None] >> (8 * np.arange(4, dtype=np.uint64))) & np.uint64(0xFF)).astype(np.uint8)


def _add64(buf: np.ndarray, at: np.ndarray, delta: int) -> None:
    """Add ``delta`` (mod 2**64) to the little-endian u64 fields at byte indexes ``at`` of ``buf``."""
    idx = at[:, None] + np.arange(8)
    val = buf[idx].copy().view("<u8").ravel()
    val = val + np.uint64(delta % 2**64)
    buf[idx] = val.view(np.uint8).reshape(-1, 8)


class KernelImage:
    """A decompressed x86-64 kernel: its sections, its loaded image and its boot-time patch sites.

    Parameters
    ----------
    payload : bytes
        The decompressed bzImage payload: the ELF file, then the relocation table.
    """

    def __init__(self, payload: bytes) -> None:
        sections, elf_end = _sections(payload)
        self.sections = {s.name: s for s in sections}
        self.relocations = parse_relocations(payload[elf_end:])
        text = self.sections.get(".text")
        if text is None or text.addr != START_KERNEL_MAP + LOAD_PHYSICAL_ADDR:
            raise InputError("the kernel's .text is not at the usual x86-64 link address", where="vmlinux")
        # The image as loaded: every allocated section at its link-time address (NOBITS left zero).
        top = max(s.addr + s.size for s in sections if s.addr >= text.addr)
        self._image = np.zeros(top - text.addr, np.uint8)
        for s in sections:
            if s.addr >= text.addr and s.size and s.offset + s.size <= elf_end and s.name != ".bss":
                self._image[s.addr - text.addr:s.addr - text.addr + s.size] = \
                    np.frombuffer(payload, np.uint8, s.size, s.offset)
        self.base = text.addr

    @classmethod
    def from_vmlinuz(cls, path: str | Path) -> KernelImage:
        """The image of the bzImage at ``path`` (decompressed once per file and kept, in this process
        and under the VIMS cache folder ``kernel-image``)."""
        p = Path(path).resolve()
        return _load(str(p), p.stat().st_mtime_ns)

    def section(self, name: str) -> Section:
        """The section header ``name`` (:class:`InputError` if the image has none)."""
        if name not in self.sections:
            raise InputError(f"no {name} section in the kernel image", where="vmlinux")
        return self.sections[name]

    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes at link-time address ``addr`` of the image as linked (not relocated)."""
        lo = addr - self.base
        if lo < 0 or lo + size > len(self._image):
            raise InputError(f"{addr:#x}+{size} is outside the kernel image", where="vmlinux")
        return self._image[lo:lo + size].tobytes()

    def loaded(self, offset: int, start: int, end: int) -> np.ndarray:
        """Link-time range ``[start, end)`` of the image relocated by virtual ``offset`` (a copy)."""
        out = self._image[start - self.base:end - self.base].copy()
        if not offset:
            return out
        rel = self.relocations
        for table, size, sign in ((rel.r32, 4, 1), (rel.inverse32, 4, -1), (rel.r64, 8, 1)):
            lo, hi = np.searchsorted(table, [np.uint64(start % 2**64), np.uint64((end - size + 1) % 2**64)])
            at = (table[lo:hi] - np.uint64(start % 2**64)).astype(np.int64)
            (_add32 if size == 4 else _add64)(out, at, sign * offset)
        return out

    # -- patch sites (as offsets from ``base``, the link-time ``_text``) ---------------------------
    def _table(self, start: int, stop: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """The records of ``dtype`` in link-time ``[start, stop)`` and each record's offset from ``base``."""
        data = np.frombuffer(self.read(start, stop - start), dtype)
        return data, (start - self.base) + np.arange(len(data), dtype=np.int64) * dtype.itemsize

    def _absolute(self, addr: np.ndarray) -> np.ndarray:
        """Absolute link-time addresses (u64) as offsets from ``base``."""
        return (addr.astype(np.uint64) - np.uint64(self.base)).view(np.int64)

    def alternatives(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """``.altinstructions`` in ``[start, stop)``: ``instr``, ``repl`` addresses, ``cpuid``,
        ``instrlen``, ``repllen``."""
        rec, at = self._table(start, stop, _ALT)
        return {"instr": at + rec["instr"], "repl": at + 4 + rec["repl"], "cpuid": rec["cpuid"].astype(int),
                "instrlen": rec["instrlen"].astype(int), "repllen": rec["repllen"].astype(int)}

    def paravirt(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """``.parainstructions`` in ``[start, stop)``: ``instr`` (offset from ``base``), ``type``, ``len``."""
        rec, _ = self._table(start, stop, _PARA)
        return {"instr": self._absolute(rec["instr"]), "type": rec["type"].astype(int), "len": rec["len"].astype(int)}

    def relative_sites(self, start: int, stop: int) -> np.ndarray:
        """A table of ``s32`` self-relative addresses (``.retpoline_sites``, ``.return_sites``,
        ``.smp_locks``) as offsets from ``base``."""
        rec, at = self._table(start, stop, np.dtype("<i4"))
        return at + rec

    def jump_entries(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """``__jump_table`` in ``[start, stop)``: each site's ``code`` and ``target`` address."""
        rec, at = self._table(start, stop, _JUMP)
        return {"code": at + rec["code"], "target": at + 4 + rec["target"]}

    def static_call_sites(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """``.static_call_sites``: each site's ``addr``, its ``key`` address and ``tail`` flag."""
        rec, at = self._table(start, stop, _SCALL)
        key = at + 4 + rec["key"]
        return {"addr": at + rec["addr"], "key": key & ~3, "tail": (key & 1).astype(bool)}

    def absolute_sites(self, start: int, stop: int) -> np.ndarray:
        """A table of 64-bit link-time addresses (``__mcount_loc``), as offsets from ``base``."""
        rec, _ = self._table(start, stop, np.dtype("<u8"))
        return self._absolute(rec)


@lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int) -> KernelImage:
    del mtime_ns  # part of the cache key only
    return KernelImage(_payload(Path(path)))


def _payload(vmlinuz: Path) -> bytes:
    """The decompressed payload of ``vmlinuz``, kept under the VIMS cache by the image's digest
    (decompressing Debian's xz image takes seconds; reading the kept copy, milliseconds)."""
    packed = vmlinuz.read_bytes()
    kept = cache_dir("kernel-image") / f"{hashlib.sha256(packed).hexdigest()[:24]}.vmlinux"
    if kept.exists():
        return kept.read_bytes()
    payload = extract_vmlinux(packed, where=str(vmlinuz))
    partial = kept.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(payload)
    partial.replace(kept)
    return payload

# -- the states the kernel can leave at its patch sites ---------------------------------------------

#: The x86-64 NOPs ``add_nops`` writes (``x86_nops``, P6 forms), by length.
NOPS = {1: b"\x90", 2: b"\x66\x90", 3: b"\x0f\x1f\x00", 4: b"\x0f\x1f\x40\x00", 5: b"\x0f\x1f\x44\x00\x00",
        6: b"\x66\x0f\x1f\x44\x00\x00", 7: b"\x0f\x1f\x80\x00\x00\x00\x00",
        8: b"\x0f\x1f\x84\x00\x00\x00\x00\x00"}
NOP5 = NOPS[5]
RET_INT3 = b"\xc3\xcc\xcc\xcc\xcc"  # ``ret`` padded with INT3 (return sites, static calls)
XOR5RAX = b"\x2e\x2e\x2e\x31\xc0"  # a static call to __static_call_return0: ``cs cs cs xor %eax, %eax``
_NOP_SET = tuple(NOPS.values())


def is_nops(code: bytes) -> bool:
    """Whether ``code`` is a sequence of the kernel's NOPs (empty included).

    >>> is_nops(NOPS[8] + NOPS[3]), is_nops(b"\\x90\\x90"), is_nops(b"\\x0f\\x1f\\x44\\x00")
    (True, True, False)
    """
    i = 0
    while i < len(code):
        for nop in _NOP_SET:
            if code.startswith(nop, i):
                i += len(nop)
                break
        else:
            return False
    return True


def rel_target(code: bytes, at: int) -> int | None:
    """The destination of a ``call``/``jmp`` rel32 or ``jmp`` rel8 at ``at`` (None if ``code`` is not one)."""
    if len(code) >= 5 and code[0] in (0xE8, 0xE9):
        return at + 5 + struct.unpack_from("<i", code, 1)[0]
    if len(code) >= 2 and code[0] == 0xEB:
        return at + 2 + struct.unpack_from("<b", code, 1)[0]
    return None


def _gather(code: np.ndarray, at: np.ndarray, size: int) -> np.ndarray:
    """``size`` bytes of ``code`` at each index of ``at`` (rows; indexes past the end read as 0)."""
    idx = at[:, None] + np.arange(size)
    return np.where(idx < len(code), code[np.minimum(idx, len(code) - 1)], 0).astype(np.uint8)


def _rel32(rows: np.ndarray, sites: np.ndarray, first: int = 1) -> np.ndarray:
    """The destination (text index) of the rel32 at byte ``first`` of each row at index ``sites``."""
    disp = rows[:, first:first + 4].copy().view("<i4").ravel().astype(np.int64)
    return sites + first + 4 + disp


class PatchSites:
    """The kernel's own patch sites in its text, and whether a change there is one the kernel makes.

    Parameters
    ----------
    image : KernelImage
    profile : KernelProfile
        The relocated profile of the running kernel (its symbols at run-time addresses).
    offset : int
        The KASLR virtual offset (run time minus link time).
    start, end : int
        The run-time text range checked (``_stext``, ``_etext``); sites elsewhere are left out.
    """

    def __init__(self, image: KernelImage, profile: Any, offset: int, start: int, end: int) -> None:
        self.image, self.profile, self.offset, self.start, self.n = image, profile, offset, start, end - start
        self._to_index = image.base + offset - start  # text index = site offset + this

        def link(name: str) -> int:
            return int(profile.symbol(name)) - offset

        def section(name: str) -> tuple[int, int]:
            s = image.section(name)
            return s.addr, s.addr + s.size

        self.alt = image.alternatives(*section(".altinstructions"))
        self.pv = image.paravirt(*section(".parainstructions"))
        self.retpolines = self._inside(image.relative_sites(*section(".retpoline_sites")))
        self.returns = self._inside(image.relative_sites(*section(".return_sites")))
        self.locks = self._inside(image.relative_sites(*section(".smp_locks")))
        self.jumps = image.jump_entries(link("__start___jump_table"), link("__stop___jump_table"))
        self.calls = image.static_call_sites(link("__start_static_call_sites"), link("__stop_static_call_sites"))
        self.mcount = self._inside(image.absolute_sites(link("__start_mcount_loc"), link("__stop_mcount_loc")))
        self.trampolines = {a - start: name[len("__SCT__"):] for name, a in profile.symbols_between(start, end)
                            if name.startswith("__SCT__")}
        repl = section(".altinstr_replacement")
        self._repl_base = repl[0] - image.base
        self._repl = image.loaded(offset, *repl)

    def _inside(self, offsets: np.ndarray) -> np.ndarray:
        idx = offsets + self._to_index
        return np.sort(idx[(idx >= 0) & (idx < self.n)])

    def address(self, index: int) -> int:
        """The run-time address of text index ``index``."""
        return self.start + index

    # -- the states ------------------------------------------------------------------------------
    def explain(self, current: np.ndarray, reference: np.ndarray, read: Any) -> tuple[np.ndarray, dict[str, int]]:
        """The changes that are not the kernel's own patching, and how many sites of each kind changed.

        Parameters
        ----------
        current, reference : numpy.ndarray
            The text as it is and as the relocated image has it (uint8, same length).
        read : callable
            ``read(address, size) -> bytes`` of the running kernel's memory (the current targets of
            static calls, paravirt operations and the return thunk are read there).

        Returns
        -------
        foreign : numpy.ndarray
            Text indexes, sorted: the changed bytes no site in a state the kernel can put there
            covers, and the first byte of each alternative site whose choice contradicts the others'
            about a CPU feature (changed or not: reverting a replacement to the image's original
            bytes is caught so).
        kinds : dict
            Sites in a changed, legitimate state, by kind.
        """
        changed = current != reference
        ok = np.zeros(len(current), bool)
        kinds: dict[str, int] = {}
        ctx = _States(self, current, reference, changed, read)
        for kind, method in (("ftrace sites", ctx.mcount), ("return sites", ctx.returns),
                             ("retpoline sites", ctx.retpolines), ("SMP lock prefixes", ctx.locks),
                             ("jump labels", ctx.jump_labels), ("static calls", ctx.static_calls),
                             ("static-call trampolines", ctx.trampolines), ("paravirt sites", ctx.paravirt),
                             ("alternatives", ctx.alternatives)):
            count = method(ok)
            if count:
                kinds[kind] = count
        foreign = np.flatnonzero(changed & ~ok)
        return np.union1d(foreign, np.asarray(ctx.contradicted, np.int64)), kinds


class _States:
    """One comparison's view of the sites: each method marks the bytes of the sites whose current
    code is a state the kernel can put there (in ``ok``) and returns how many changed sites it found so."""

    def __init__(self, sites: PatchSites, current: np.ndarray, reference: np.ndarray, changed: np.ndarray,
                 read: Any) -> None:
        self.s, self.cur, self.ref, self.read = sites, current, reference, read
        self._changed = np.flatnonzero(changed)
        self._u64: dict[int, int] = {}
        self.contradicted: list[int] = []

    # -- helpers
    def hits(self, at: np.ndarray, size: int | np.ndarray) -> np.ndarray:
        """For each site of ``at`` (text indexes), whether a byte of its ``size`` bytes changed."""
        return np.asarray(np.searchsorted(self._changed, at) < np.searchsorted(self._changed, at + size))

    def touched(self, at: np.ndarray, size: int | np.ndarray) -> np.ndarray:
        """The sites of ``at`` with a changed byte in their ``size`` bytes."""
        return at[self.hits(at, size)]

    def now(self, i: int, n: int) -> bytes:
        return self.cur[i:i + n].tobytes()

    def then(self, i: int, n: int) -> bytes:
        return self.ref[i:i + n].tobytes()

    def u64(self, addr: int) -> int:
        """A pointer in the running kernel (a static call's function, a paravirt op, the return thunk)."""
        if addr not in self._u64:
            self._u64[addr] = int.from_bytes(self.read(addr, 8), "little")
        return self._u64[addr]

    def symbol(self, name: str) -> int | None:
        profile = self.s.profile
        return int(profile.symbol(name)) if profile.has_symbol(name) else None

    def return_thunk(self) -> int | None:
        """Where ``x86_return_thunk`` points now (None on kernels without it)."""
        at = self.symbol("x86_return_thunk")
        return self.u64(at) if at is not None else self.symbol("__x86_return_thunk")

    @staticmethod
    def mark(ok: np.ndarray, at: np.ndarray | int, size: int) -> None:
        if isinstance(at, np.ndarray):
            if len(at):
                ok[(at[:, None] + np.arange(size)).ravel().clip(0, len(ok) - 1)] = True
        else:
            ok[at:at + size] = True

    # -- the kinds
    def mcount(self, ok: np.ndarray) -> int:
        """ftrace call sites: ``call __fentry__`` (as built), a 5-byte NOP or a call to the ftrace caller."""
        at = self.touched(self.s.mcount, 5)
        rows = _gather(self.cur, at, 5)
        good = (rows == np.frombuffer(NOP5, np.uint8)).all(axis=1) | (rows == _gather(self.ref, at, 5)).all(axis=1)
        callers = [a - self.s.start for a in map(self.symbol, ("ftrace_caller", "ftrace_regs_caller")) if a]
        good |= (rows[:, 0] == 0xE8) & np.isin(_rel32(rows, at), callers)
        self.mark(ok, at[good], 5)
        return int(good.sum())

    def returns(self, ok: np.ndarray) -> int:
        """``jmp __x86_return_thunk``: as built, ``ret`` padded with INT3, or a jump to the return thunk in use."""
        at = self.touched(self.s.returns, 5)
        rows = _gather(self.cur, at, 5)
        good = (rows == np.frombuffer(RET_INT3, np.uint8)).all(axis=1) | (rows == _gather(self.ref, at, 5)).all(axis=1)
        thunk = self.return_thunk()
        if thunk is not None:
            good |= (rows[:, 0] == 0xE9) & (_rel32(rows, at) == thunk - self.s.start)
        good &= _gather(self.ref, at, 1)[:, 0] == 0xE9
        self.mark(ok, at[good], 5)
        return int(good.sum())

    def locks(self, ok: np.ndarray) -> int:
        """``lock`` prefixes, which a kernel on one CPU turns into ``ds`` (0x3e)."""
        at = self.touched(self.s.locks, 1)
        good = (self.ref[at] == 0xF0) & np.isin(self.cur[at], (0xF0, 0x3E))
        ok[at[good]] = True
        return int(good.sum())

    def retpolines(self, ok: np.ndarray) -> int:
        """``call``/``jmp __x86_indirect_thunk_REG``: as built, or ``[lfence;] call/jmp *%REG`` and NOPs."""
        array = self.symbol("__x86_indirect_thunk_array")
        count = 0
        for i in self.touched(self.s.retpolines, 5).tolist():
            orig = self.then(i, 5)
            target = rel_target(orig, i)
            if array is None or target is None or orig[0] == 0xEB:
                continue
            reg, rest = divmod(target - (array - self.s.start), 32)
            if rest or not 0 <= reg < 16:
                continue
            insn = (b"\x41" if reg >= 8 else b"") + bytes([0xFF, (0xD0 if orig[0] == 0xE8 else 0xE0) + reg % 8])
            now = self.now(i, 5)
            if any(now.startswith(p + insn) and is_nops(now[len(p + insn):]) for p in (b"", b"\x0f\xae\xe8")):
                self.mark(ok, i, 5)
                count += 1
        return count

    def jump_labels(self, ok: np.ndarray) -> int:
        """Static keys: each ``__jump_table`` site is a NOP or a jump to its target, of its built size."""
        s = self.s
        codes = s.jumps["code"] + s._to_index
        targets = dict(zip(codes.tolist(), (s.jumps["target"] + s._to_index).tolist(), strict=True))
        inside = codes[(codes >= 0) & (codes < s.n)]
        count = 0
        for i in self.touched(np.unique(inside), 5).tolist():
            orig = self.then(i, 5)
            size = 5 if orig[0] == 0xE9 or orig == NOP5 else 2 if orig[0] == 0xEB or orig[:2] == NOPS[2] else 0
            now = self.now(i, size)
            if size and (now == NOPS[size] or (now[0] == (0xE9 if size == 5 else 0xEB)
                                               and rel_target(now, i) == targets[i])):
                self.mark(ok, i, size)
                count += 1
        return count

    def _call_state(self, now: bytes, at: int, func: int, tail: bool) -> bool:
        """Whether ``now`` is what ``static_call_update`` writes for ``func`` at run-time address ``at``."""
        if now in (NOP5, RET_INT3) or (now == XOR5RAX and func == self.symbol("__static_call_return0")):
            return True
        target = rel_target(now, at)
        if now[0] == 0xE8 or (tail and now[0] == 0xE9):
            return target == func or (tail and target == self.return_thunk())
        return False

    def static_calls(self, ok: np.ndarray) -> int:
        """``.static_call_sites``: a call (or tail jump) to the key's current function, a NOP or a return."""
        s = self.s
        addrs = s.calls["addr"] + s._to_index
        keys = dict(zip(addrs.tolist(), zip(s.calls["key"].tolist(), s.calls["tail"].tolist(), strict=True),
                        strict=True))
        count = 0
        for i in self.touched(np.unique(addrs[(addrs >= 0) & (addrs < s.n)]), 5).tolist():
            key, tail = keys[i]
            func = self.u64(s.image.base + s.offset + key)
            if self._call_state(self.now(i, 5), s.start + i, func, tail):
                self.mark(ok, i, 5)
                count += 1
        return count

    def trampolines(self, ok: np.ndarray) -> int:
        """``__SCT__*`` trampolines: a jump to the key's (``__SCK__*``) function, or a return."""
        count = 0
        at = np.array(sorted(self.s.trampolines), dtype=np.int64)
        for i in self.touched(at, 5).tolist():
            key = self.symbol("__SCK__" + self.s.trampolines[i])
            now = self.now(i, 5)
            if key is not None and now[0] != 0xE8 and self._call_state(now, self.s.start + i, self.u64(key), True):
                self.mark(ok, i, 5)
                count += 1
        return count

    def paravirt(self, ok: np.ndarray) -> int:
        """``.parainstructions``: a direct call to the operation in ``pv_ops`` (or NOPs for a no-op), NOP-padded."""
        s = self.s
        pv_ops, nop = self.symbol("pv_ops"), self.symbol("_paravirt_nop")
        at = s.pv["instr"] + s._to_index
        pick = (at >= 0) & (at < s.n)
        pick[pick] = self.hits(at[pick], s.pv["len"][pick])
        count = 0
        for i, kind, size in zip(at[pick].tolist(), s.pv["type"][pick].tolist(), s.pv["len"][pick].tolist(),
                                 strict=True):
            if pv_ops is None:
                continue
            func, now = self.u64(pv_ops + 8 * kind), self.now(i, size)
            if (func == nop and is_nops(now)) or (now[:2] == b"\x0f\x0b" and is_nops(now[2:])) or \
                    (now[0] == 0xE8 and rel_target(now, s.start + i) == func and is_nops(now[5:])):
                self.mark(ok, i, size)
                count += 1
        return count

    def _replacement(self, now: bytes, instr: int, repl: int, size: int) -> bool:
        """Whether ``now`` (at text index ``instr``) is ``apply_alternatives``' copy of the replacement at
        offset ``repl`` (from the image base) of ``size`` bytes: a ``call`` re-targeted, a ``jmp``
        re-targeted (and shortened when it fits), the rest NOP padding."""
        s = self.s
        code = s._repl[repl - s._repl_base:repl - s._repl_base + size].tobytes()
        if size == 5 and code[0] in (0xE8, 0xE9):
            # Both as offsets from the image base: the copy must reach the replacement's target.
            target = rel_target(code, repl)
            got = rel_target(now, instr - s._to_index)
            length = 2 if now[0] == 0xEB else 5
            return got == target and (now[0] != 0xEB or code[0] == 0xE9) and is_nops(now[length:])
        return now.startswith(code) and is_nops(now[size:])

    def alternatives(self, ok: np.ndarray) -> int:
        """``.altinstructions``: a site holds one of its replacements (NOP-padded), or its original
        instructions with their 0x90 padding turned into long NOPs (changes inside the original are
        left to the other kinds of sites). Every site, changed or not, is also evidence of which CPU
        features the kernel found (:meth:`_contradictions`)."""
        s, alt = self.s, self.s.alt
        at = alt["instr"] + s._to_index
        inside = np.flatnonzero((at >= 0) & (at < s.n))
        starts, which = np.unique(at[inside], return_inverse=True)
        sizes = np.zeros(len(starts), np.int64)
        np.maximum.at(sizes, which, alt["instrlen"][inside])
        hit = self.hits(starts, sizes)
        sites: dict[int, list[int]] = {}
        for j, k in zip(inside.tolist(), which.tolist(), strict=True):
            sites.setdefault(k, []).append(j)
        evidence: dict[tuple[int, bool], set[int]] = {}
        count = 0
        for k, entries in sites.items():
            i, size = int(starts[k]), int(sizes[k])
            now, orig = self.now(i, size), self.then(i, size)
            pad = len(orig) - len(orig.rstrip(b"\x90"))
            original = now[:size - pad] == orig[:size - pad] and is_nops(now[size - pad:])
            shown = [n for n, j in enumerate(entries)
                     if self._replacement(now, i, int(alt["repl"][j]), int(alt["repllen"][j]))]
            self._evidence(evidence, i, entries, shown[-1] if shown else None, original)
            if not hit[k]:
                continue
            if shown:
                self.mark(ok, i, size)
                count += 1
            elif pad and is_nops(now[size - pad:]):
                self.mark(ok, i + size - pad, pad)
        self.contradicted = self._contradictions(evidence)
        return count

    def _evidence(self, evidence: dict[tuple[int, bool], set[int]], site: int, entries: list[int],
                  shown: int | None, original: bool) -> None:
        """Record what one site says about the features of its ``entries`` (applied in order, the last
        whose feature the CPU has wins): the one ``shown`` was selected, those after it were not."""
        if shown is not None and original:
            return  # a replacement that looks like the original says nothing
        if shown is None and not original:
            return  # neither: the bytes are judged elsewhere
        later = entries if shown is None else entries[shown + 1:]
        for n, j in ([(True, entries[shown])] if shown is not None else []) + [(False, j) for j in later]:
            cpuid = int(self.s.alt["cpuid"][j])
            # ALTINSTR_FLAG_INV (bit 15): the replacement is selected when the CPU lacks the feature.
            evidence.setdefault((cpuid & 0x7FFF, n != bool(cpuid & 0x8000)), set()).add(site)

    @staticmethod
    def _contradictions(evidence: dict[tuple[int, bool], set[int]]) -> list[int]:
        """Sites that disagree with the others about a feature (the fewer side; both on a tie)."""
        out: set[int] = set()
        for (feature, has), sites in evidence.items():
            other = evidence.get((feature, not has), set())
            if has and other:
                out |= sites if len(sites) <= len(other) else set()
                out |= other if len(other) <= len(sites) else set()
        return sorted(out)
