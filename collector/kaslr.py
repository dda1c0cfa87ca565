"""The kernel's load offsets under KASLR, found in guest RAM with no help from the guest.

x86-64 KASLR moves the kernel twice: its physical load address (where the decompressor put it) and
its virtual address (``_text`` somewhere above ``__START_KERNEL_map``), both in 2 MiB steps
(``CONFIG_PHYSICAL_ALIGN``). :func:`find_kaslr` finds them from a relocatable profile
(:mod:`vims.collector.kallsyms`: link-time addresses) and the guest's physical memory:

1. **physical**: the kernel's own ``linux_banner`` string (read from the profile's kernel image, or
   ``"Linux version "`` plus the release) sits in RAM at an address whose offset within 2 MiB is the
   link-time one; the first such match that is followed by the rest of the banner gives the physical
   address of ``_text``;
2. **virtual**: the ``phys_base`` variable (now at a known physical address) holds
   ``pa(_text) - (va(_text) - __START_KERNEL_map)``, so it gives ``va(_text)``;
3. **confirmed by the page tables**: the kernel's top-level table ``init_top_pgt`` (at a known
   physical address) must map the ``va(_text)`` found to the ``pa(_text)`` found; and, if a GDB stub
   is given, so must the tables of the CR3 a vCPU runs with (PCID and PTI bits masked).

>>> r = KaslrOffsets(0x1000000, 0x3a000000, 0xffffffff81000000, 0xffffffff8e600000, 4, ["banner"])
>>> hex(r.virtual_offset), hex(r.physical_offset)
('0xd600000', '0x39000000')
>>> hex(KaslrOffsets(0x1000000, 0x8800000, 0xffffffff81000000, 0xffffffffafe00000, 5).phys_base)
'-0x27600000'
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vims.collector.memory import (
    START_KERNEL_MAP,
    AddressSpace,
    GuestMemoryError,
    PhysicalMemory,
    pgd_base,
)
from vims.errors import VimsError

__all__ = ["KaslrError", "KaslrOffsets", "find_kaslr", "find_kaslr_in", "relocate"]

#: KASLR moves the kernel in steps of CONFIG_PHYSICAL_ALIGN (2 MiB on Debian's kernel).
ALIGN = 0x200000


class KaslrError(VimsError):
    """The kernel's load offsets could not be found in guest memory."""


@dataclass(frozen=True)
class KaslrOffsets:
    """Where the kernel was loaded, against where it was linked.

    Attributes
    ----------
    link_text, text_paddr, link_text_va, text_vaddr : int
        ``_text``'s link-time physical address (``link_text``), its physical address in RAM,
        its link-time virtual address and its run-time virtual address.
    paging_levels : int
        4 or 5 (read from ``__pgtable_l5_enabled``).
    how : list of str
        The evidence, in order (``banner``, ``phys_base``, ``init_top_pgt``, ``cr3``).
    """

    link_text: int
    text_paddr: int
    link_text_va: int
    text_vaddr: int
    paging_levels: int
    how: list[str] = field(default_factory=list)

    @property
    def virtual_offset(self) -> int:
        """Run-time minus link-time virtual address: add it to every profile symbol."""
        return self.text_vaddr - self.link_text_va

    @property
    def physical_offset(self) -> int:
        """Physical load address of ``_text`` minus its link-time one."""
        return self.text_paddr - self.link_text

    @property
    def phys_base(self) -> int:
        """The kernel's ``phys_base``: ``pa = va - __START_KERNEL_map + phys_base`` in its image.

        Negative when the kernel sits lower in physical memory than KASLR moved it virtually (the
        variable then holds it modulo 2**64).
        """
        return self.text_paddr - (self.text_vaddr - START_KERNEL_MAP)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (hex strings for addresses), as ``vims guest status --json`` shows it."""
        return {
            "virtual_offset": hex(self.virtual_offset),
            "physical_offset": hex(self.physical_offset),
            "text_vaddr": hex(self.text_vaddr),
            "text_paddr": hex(self.text_paddr),
            "phys_base": hex(self.phys_base),  # may be negative
            "paging_levels": self.paging_levels,
            "how": list(self.how),
        }


def _banner(profile: Any) -> bytes:
    """The start of the kernel's ``linux_banner`` (what ``/proc/version`` prints)."""
    text = str(profile.metadata.get("banner") or "")
    if text:  # up to the build number: a profile that kept the image's template copy still matches
        return text.split(" #", 1)[0].encode("latin-1")
    return f"Linux version {profile.release} ".encode()


def _find_text_paddr(memory: PhysicalMemory, profile: Any) -> int:
    """Physical address of ``_text``: the banner whose offset within 2 MiB is the link-time one."""
    link_text = profile.symbol("_text")
    banner_off = profile.symbol("linux_banner") - link_text
    banner = _banner(profile)
    want = (link_text - START_KERNEL_MAP + banner_off) % ALIGN
    for region in memory.regions:
        pos, end = region.paddr, region.paddr + region.size
        while True:
            found = memory.find(banner, pos, end)
            if found < 0:
                break
            if found % ALIGN == want:
                return found - banner_off
            pos = found + 1
    raise KaslrError(f"no kernel banner {banner[:40]!r} at a 2 MiB-aligned place in guest RAM "
                     "(another kernel, or not booted yet?)")


def find_kaslr_in(memory: PhysicalMemory, profile: Any, cr3: int | None = None) -> KaslrOffsets:
    """The load offsets of the kernel of ``profile`` (link-time symbols) in ``memory``.

    Parameters
    ----------
    memory : PhysicalMemory
    profile : KernelProfile
        A profile with link-time addresses (``metadata.relocatable``).
    cr3 : int, optional
        A CR3 value read from a vCPU: its tables must map the kernel the same way.
    """
    link_text = profile.symbol("_text")
    text_pa = _find_text_paddr(memory, profile)
    how = ["banner"]

    def pa(name: str) -> int:
        return text_pa + profile.symbol(name) - link_text

    phys_base = memory.u64(pa("phys_base"))
    if phys_base >> 63:  # the physical offset is below the virtual one: phys_base is negative
        phys_base -= 1 << 64
    text_va = text_pa - phys_base + START_KERNEL_MAP
    if phys_base % ALIGN or not START_KERNEL_MAP <= text_va < START_KERNEL_MAP + (1 << 30):
        raise KaslrError(f"phys_base reads {phys_base:#x}: not this kernel's image")
    how.append("phys_base")
    levels = 4
    if profile.has_symbol("__pgtable_l5_enabled") and memory.u32(pa("__pgtable_l5_enabled")):
        levels = 5
    tables = [("init_top_pgt", pa("init_top_pgt"))]
    if cr3 is not None:
        tables.append(("cr3", pgd_base(cr3)))
    for what, root in tables:
        try:
            got = AddressSpace(memory, root, la57=levels == 5).translate(text_va)
        except GuestMemoryError as exc:
            raise KaslrError(f"{what} does not map _text at {text_va:#x}: {exc}") from None
        if got != text_pa:
            raise KaslrError(f"{what} maps _text at {text_va:#x} to {got:#x}, not to {text_pa:#x}")
        how.append(what)
    return KaslrOffsets(link_text - START_KERNEL_MAP, text_pa, link_text, text_va, levels, how)


def find_kaslr(
    memory_path: str | Path, profile: Any, gdb: tuple[str, int] | None = None
) -> KaslrOffsets:
    """:func:`find_kaslr_in` on a guest's RAM file; with ``gdb``, also checked against a vCPU's CR3.

    The GDB stub is asked only for CR3 (the vCPU is halted for one register read); if another client
    holds the stub, the check is left out (``how`` then lacks ``cr3``).
    """
    cr3 = None
    if gdb is not None:
        from vims.collector.gdbstub import GdbStub

        with contextlib.suppress(OSError, VimsError), GdbStub(*gdb, timeout=5.0) as stub:
            stub.halt()
            try:
                cr3 = int(stub.registers().get("cr3", 0)) or None
            finally:
                stub.resume()
    with PhysicalMemory.open(memory_path) as memory:
        return find_kaslr_in(memory, profile, cr3)


def relocate(memory: PhysicalMemory, profile: Any) -> Any:
    """``profile`` relocated to where the kernel in ``memory`` runs (unchanged if not relocatable)."""
    if not getattr(profile, "relocatable", False):
        return profile
    found = find_kaslr_in(memory, profile)
    return profile.relocated(found.virtual_offset, found.phys_base)
