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
   is given, so must the tables of the CR3 a vCPU runs with (PCID and PTI bits masked);
4. **the live one**: a reboot in place does not clear RAM, so the previous boot's kernel can still sit,
   whole and self-consistent, at its old place. When more than one candidate passes 1-3, the CR3 of a
   vCPU decides if it was given; otherwise the kernel whose ``jiffies_64`` advances is the running
   one (a leftover copy's clock stands still), which :func:`is_live` also tells for a relocated profile.

>>> r = KaslrOffsets(0x1000000, 0x3a000000, 0xffffffff81000000, 0xffffffff8e600000, 4, ["banner"])
>>> hex(r.virtual_offset), hex(r.physical_offset)
('0xd600000', '0x39000000')
>>> hex(KaslrOffsets(0x1000000, 0x8800000, 0xffffffff81000000, 0xffffffffafe00000, 5).phys_base)
'-0x27600000'
"""

from __future__ import annotations

import contextlib
import time
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

__all__ = ["KaslrError", "KaslrOffsets", "at_clock_pace", "find_kaslr", "find_kaslr_in", "is_live", "relocate"]

#: KASLR moves the kernel in steps of CONFIG_PHYSICAL_ALIGN (2 MiB on Debian's kernel).
ALIGN = 0x200000
#: Seconds to watch the kernels' clocks for the one that runs (a tickless idle guest may let ``jiffies``
#: stand for a while; a busy one moves it every few milliseconds).
SETTLE_S = 3.0
#: The fastest a kernel's clock ticks (CONFIG_HZ is at most 1000).
MAX_HZ = 1000


def at_clock_pace(ticks: int, seconds: float) -> bool:
    """Whether a kernel clock could have moved by ``ticks`` in ``seconds`` (not back, not faster than
    :data:`MAX_HZ`, a second of slack): memory a new boot writes over moves any other way.

    >>> at_clock_pace(250, 1.0), at_clock_pace(0, 5.0), at_clock_pace(-1, 1.0), at_clock_pace(10**6, 1.0)
    (True, True, False, False)
    """
    return 0 <= ticks <= MAX_HZ * (seconds + 1.0)


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


def _text_candidates(memory: PhysicalMemory, profile: Any) -> list[int]:
    """Physical addresses of ``_text`` of every copy of the kernel in RAM: each banner whose offset
    within 2 MiB is the link-time one (a reboot in place leaves the previous boot's copy)."""
    link_text = profile.symbol("_text")
    banner_off = profile.symbol("linux_banner") - link_text
    banner = _banner(profile)
    want = (link_text - START_KERNEL_MAP + banner_off) % ALIGN
    found_at = []
    for region in memory.regions:
        pos, end = region.paddr, region.paddr + region.size
        while (found := memory.find(banner, pos, end)) >= 0:
            if found % ALIGN == want:
                found_at.append(found - banner_off)
            pos = found + 1
    if not found_at:
        raise KaslrError(f"no kernel banner {banner[:40]!r} at a 2 MiB-aligned place in guest RAM "
                         "(another kernel, or not booted yet?)")
    return found_at


def _offsets_at(memory: PhysicalMemory, profile: Any, text_pa: int, cr3: int | None) -> KaslrOffsets:
    """The offsets of the kernel copy whose ``_text`` is at ``text_pa``, checked by its own page tables
    (and by ``cr3``'s, if given); :class:`KaslrError` if they do not hold."""
    link_text = profile.symbol("_text")
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


def _advancing(read_clocks: list[Any], settle: float, after: float = 0.25) -> list[bool]:
    """Which of the clocks (functions reading a counter) change: watched until ``after`` seconds past
    the first change (so that two moving clocks are both seen), or ``settle`` seconds if none moves."""
    first = [read() for read in read_clocks]
    moved = [False] * len(read_clocks)
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline and not all(moved):
        for i, read in enumerate(read_clocks):
            moved[i] = moved[i] or read() != first[i]
        if any(moved):
            deadline = min(deadline, time.monotonic() + after)
        time.sleep(0.01)
    return moved


def _live_copy(memory: PhysicalMemory, profile: Any, found: list[KaslrOffsets], settle: float) -> KaslrOffsets:
    """The one of the self-consistent kernel copies that runs: the one whose ``jiffies_64`` moves."""
    link_text = profile.symbol("_text")
    at = [f.text_paddr + profile.symbol("jiffies_64") - link_text for f in found]
    moved = _advancing([lambda a=a: memory.u64(a) for a in at], settle)
    live = [f for f, m in zip(found, moved, strict=True) if m]
    places = ", ".join(f"{f.text_paddr:#x}" for f in found)
    if len(found) == 1 and not live:
        raise KaslrError(f"the kernel in guest RAM (_text at {places}) does not run: its clock stood still for "
                         f"{settle:g} s (a previous boot's copy while the guest reboots, or a paused guest)")
    if len(live) != 1:
        raise KaslrError(f"{len(found)} copies of the kernel in guest RAM (_text at {places}; a reboot in "
                         f"place leaves the previous boot's) and {len(live) or 'none'} of their clocks moved "
                         f"in {settle:g} s: is the guest paused? (give the GDB stub: a vCPU's CR3 decides)")
    return KaslrOffsets(live[0].link_text, live[0].text_paddr, live[0].link_text_va, live[0].text_vaddr,
                        live[0].paging_levels, [*live[0].how, "jiffies"])


def find_kaslr_in(memory: PhysicalMemory, profile: Any, cr3: int | None = None,
                  settle: float = SETTLE_S, require_live: bool = False) -> KaslrOffsets:
    """The load offsets of the running kernel of ``profile`` (link-time symbols) in ``memory``.

    Parameters
    ----------
    memory : PhysicalMemory
    profile : KernelProfile
        A profile with link-time addresses (``metadata.relocatable``).
    cr3 : int, optional
        A CR3 value read from a vCPU: its tables must map the kernel the same way.
    settle : float
        When RAM holds more than one consistent copy of the kernel and no ``cr3`` tells them apart,
        the seconds to watch their clocks for the one that runs.
    require_live : bool
        Watch the clock of a single copy too (a running guest's RAM, not a saved image): right after
        a reboot in place, before the new kernel is unpacked, the old copy is the only one there.
    """
    found: list[KaslrOffsets] = []
    refused: list[str] = []
    for text_pa in _text_candidates(memory, profile):
        try:
            found.append(_offsets_at(memory, profile, text_pa, cr3))
        except (KaslrError, GuestMemoryError) as exc:
            refused.append(f"{text_pa:#x}: {exc}")
    if not found:
        raise KaslrError("no copy of the kernel in guest RAM holds together: " + "; ".join(refused))
    if len(found) == 1 and (cr3 is not None or not require_live):
        return found[0]
    return _live_copy(memory, profile, found, settle)


def is_live(memory: PhysicalMemory, profile: Any, settle: float = SETTLE_S) -> bool:
    """Whether the kernel that the relocated ``profile`` places runs in ``memory`` now: its banner is
    where the profile says and its ``jiffies_64`` moves within ``settle`` seconds (after a reboot in
    place the previous boot's copy may keep its banner, but its clock stands still)."""
    from vims.collector.kernel import KernelView

    try:
        view = KernelView(memory, profile)
        if view.read(profile.symbol("linux_banner"), 14) != b"Linux version ":
            return False
        jiffies = profile.symbol("jiffies_64")
        return _advancing([lambda: view.u64(jiffies)], settle)[0]
    except (GuestMemoryError, VimsError):
        return False


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


def relocate(memory: PhysicalMemory, profile: Any, require_live: bool = False) -> Any:
    """``profile`` relocated to where the kernel in ``memory`` runs (unchanged if not relocatable);
    ``require_live``: see :func:`find_kaslr_in`."""
    if not getattr(profile, "relocatable", False):
        return profile
    found = find_kaslr_in(memory, profile, require_live=require_live)
    return profile.relocated(found.virtual_offset, found.phys_base)
