"""Page-table walking against page tables built here, in a bytes buffer, the way x86-64 lays them out."""

from __future__ import annotations

import mmap
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vims.collector.memory import (
    AddressSpace,
    KernelSpace,
    PageFaultError,
    PhysicalAddressError,
    PhysicalMemory,
    Region,
    qemu_x86_regions,
)

P, RW, PS = 0x1, 0x2, 0x80
MiB, GiB = 1 << 20, 1 << 30


class Tables:
    """A toy guest: RAM of ``size`` bytes and a page-table builder that allocates tables from 1 MiB up."""

    def __init__(self, size: int = 8 * MiB, levels: int = 4) -> None:
        self.ram = bytearray(size)
        self.levels = levels
        self.next = 1 * MiB
        self.root = self.alloc()

    def alloc(self) -> int:
        table = self.next
        self.next += 0x1000
        return table

    def entry(self, table: int, index: int) -> int:
        return struct.unpack_from("<Q", self.ram, table + 8 * index)[0]

    def map(self, vaddr: int, paddr: int, page: int = 0x1000, flags: int = P | RW) -> None:
        """Map ``vaddr`` to ``paddr`` with a page of ``page`` bytes (4 KiB, 2 MiB or 1 GiB)."""
        leaf_level = {0x1000: 0, 2 * MiB: 1, GiB: 2}[page]
        table = self.root
        for level in range(self.levels - 1, leaf_level, -1):
            index = (vaddr >> (12 + 9 * level)) & 0x1FF
            entry = self.entry(table, index)
            if not entry & P:
                entry = self.alloc() | P | RW
                struct.pack_into("<Q", self.ram, table + 8 * index, entry)
            table = entry & 0x000F_FFFF_FFFF_F000
        index = (vaddr >> (12 + 9 * leaf_level)) & 0x1FF
        struct.pack_into("<Q", self.ram, table + 8 * index, paddr | flags | (PS if leaf_level else 0))

    def space(self, **kw: object) -> AddressSpace:
        return AddressSpace(PhysicalMemory(bytes(self.ram)), self.root | 0x5, la57=self.levels == 5, **kw)


def test_4_level_small_pages_and_offsets() -> None:
    t = Tables()
    t.map(0x0000_7FFF_F000_0000, 0x20_0000)
    t.map(0x0000_7FFF_F000_1000, 0x30_0000)  # next virtual page, far away physically
    t.ram[0x20_0FFC:0x20_1000] = b"abcd"
    t.ram[0x30_0000:0x30_0004] = b"efgh"
    space = t.space()
    assert space.translate(0x0000_7FFF_F000_0123) == 0x20_0123
    assert space.translate(0x0000_7FFF_F000_1FFF) == 0x30_0FFF
    # A read across the page boundary joins both physical pages.
    assert space.read(0x0000_7FFF_F000_0FFC, 8) == b"abcdefgh"
    assert space.u64(0x0000_7FFF_F000_0FFC) == struct.unpack("<Q", b"abcdefgh")[0]


def test_cr3_flag_and_pcid_bits_are_ignored() -> None:
    t = Tables()
    t.map(0x40_0000, 0x20_0000)
    space = AddressSpace(PhysicalMemory(bytes(t.ram)), t.root | 0xFFF, la57=False)
    assert space.translate(0x40_0010) == 0x20_0010


def test_2m_and_1g_pages() -> None:
    t = Tables(size=8 * MiB)
    t.map(0xFFFF_8880_0000_0000, 0, page=GiB)  # a direct-map style 1 GiB page at physical 0
    t.map(0x0000_5555_5540_0000, 0x40_0000, page=2 * MiB)
    space = t.space()
    assert space.walk(0xFFFF_8880_0012_3456) == (0x12_3456, GiB)
    assert space.walk(0x0000_5555_5541_2345) == (0x41_2345, 2 * MiB)
    t.ram[0x41_2345:0x41_2348] = b"big"
    assert t.space().read(0x0000_5555_5541_2345, 3) == b"big"


def test_pat_bit_of_a_large_page_is_not_part_of_its_frame() -> None:
    t = Tables()
    # Bit 12 of a 2 MiB entry is PAT, not an address bit.
    t.map(0x60_0000, 0x40_0000 | 0x1000, page=2 * MiB)
    assert t.space().translate(0x60_0010) == 0x40_0010


def test_5_level_paging() -> None:
    t = Tables(levels=5)
    high = 0xFF11_0000_0000_0000  # the 5-level direct map: only a 57-bit address space has it
    t.map(high, 0x20_0000)
    t.map(0x00FF_0000_0000_0000, 0x30_0000)
    t.ram[0x20_0000:0x20_0004] = b"la57"
    space = t.space()
    assert space.la57
    assert space.translate(high + 4) == 0x20_0004
    assert space.translate(0x00FF_0000_0000_0010) == 0x30_0010
    assert space.read(high, 4) == b"la57"
    # The same tables read as 4-level are a different (wrong) walk: the level count matters.
    four = AddressSpace(PhysicalMemory(bytes(t.ram)), t.root, la57=False)
    with pytest.raises(PageFaultError):
        four.translate(0x00FF_0000_0000_0010)


def test_non_present_entries_at_every_level_name_the_level() -> None:
    t = Tables()
    t.map(0x40_0000, 0x20_0000)
    space = t.space()
    with pytest.raises(PageFaultError, match="PT entry not present") as info:
        space.translate(0x40_1000)  # same page table, next entry
    assert info.value.vaddr == 0x40_1000
    with pytest.raises(PageFaultError, match="PD entry not present"):
        space.translate(0x60_0000)
    with pytest.raises(PageFaultError, match="PDPT entry not present"):
        space.translate(0x4000_0000)
    with pytest.raises(PageFaultError, match="PML4 entry not present"):
        space.translate(0x0000_0080_0000_0000)
    with pytest.raises(PageFaultError, match="not canonical"):
        space.translate(0x0001_0000_0000_0000)
    assert not space.is_mapped(0x40_1000) and space.is_mapped(0x40_0000)


def test_entry_cleared_present_bit_is_not_mapped_even_with_a_frame() -> None:
    t = Tables()
    t.map(0x40_0000, 0x20_0000, flags=RW)  # frame and RW set, P clear: swapped out
    with pytest.raises(PageFaultError):
        t.space().translate(0x40_0000)


def test_read_across_an_unmapped_page_fails() -> None:
    t = Tables()
    t.map(0x40_0000, 0x20_0000)
    with pytest.raises(PageFaultError) as info:
        t.space().read(0x40_0FF0, 0x20)
    assert info.value.vaddr == 0x40_1000


def test_cstring_across_pages_and_at_an_unmapped_end() -> None:
    t = Tables()
    t.map(0x40_0000, 0x20_0000)
    t.map(0x40_1000, 0x50_0000)
    t.ram[0x20_0FFA:0x20_1000] = b"/etc/s"
    t.ram[0x50_0000:0x50_0008] = b"hadow\0xx"
    space = t.space()
    assert space.read_cstring(0x40_0FFA) == b"/etc/shadow"
    assert space.read_cstring(0x40_0FFA, limit=4) == b"/etc"
    t.ram[0x50_0000:0x50_1000] = b"y" * 0x1000  # no NUL before the unmapped page at 0x402000
    assert t.space().read_cstring(0x40_1FFE) == b"yy"
    with pytest.raises(PageFaultError):
        space.read_cstring(0x40_2000)


def test_physical_reads_outside_ram() -> None:
    mem = PhysicalMemory(bytes(0x2000))
    assert mem.read(0x1FF8, 8) == bytes(8)
    with pytest.raises(PhysicalAddressError, match="outside guest RAM"):
        mem.read(0x1FF9, 8)
    with pytest.raises(PhysicalAddressError):
        mem.u64(-8)


def test_a_page_table_pointing_outside_ram_is_an_error_not_a_crash() -> None:
    t = Tables()
    struct.pack_into("<Q", t.ram, t.root, 0x7_0000_0000 | P)  # PML4[0] -> far beyond RAM
    with pytest.raises(PhysicalAddressError):
        t.space().translate(0x1000)


def test_regions_above_4g() -> None:
    layout = qemu_x86_regions(4 * GiB, "pc")
    assert layout == [Region(0, 0, 3 * GiB), Region(4 * GiB, 3 * GiB, GiB)]
    buf = bytearray(0x3000)
    buf[0x2000:0x2004] = b"high"
    mem = PhysicalMemory(bytes(buf), [Region(0, 0, 0x2000), Region(0x1_0000_0000, 0x2000, 0x1000)])
    assert mem.read(0x1_0000_0000, 4) == b"high"
    assert mem.end == 0x1_0000_1000
    with pytest.raises(PhysicalAddressError):
        mem.read(0x2000, 4)  # the hole


def test_kernel_space_linear_maps_and_fallback_walk() -> None:
    t = Tables()
    vmalloc = 0xFFFF_C900_0000_0000
    t.map(vmalloc, 0x60_0000)
    t.ram[0x60_0000:0x60_0003] = b"vm!"
    t.ram[0x10_0000 - 8:0x10_0000] = b"directmp"
    mem = PhysicalMemory(bytes(t.ram))
    kernel = KernelSpace(mem, t.root, la57=False, page_offset_base=0xFFFF_8880_0000_0000)
    assert kernel.read(0xFFFF_8880_0010_0000 - 8, 8) == b"directmp"  # direct map: no tables needed
    assert kernel.translate(0xFFFF_FFFF_8100_0000) == 0x100_0000  # kernel image
    assert kernel.read(vmalloc, 3) == b"vm!"  # walked
    user = kernel.for_process(t.root)
    assert type(user) is AddressSpace and user.read(vmalloc, 3) == b"vm!"


def test_mapped_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "ram"
    path.write_bytes(b"\0" * 0x1000 + b"file" + b"\0" * 0xFFC)
    with PhysicalMemory.open(path) as mem:
        assert isinstance(mem._map, mmap.mmap)
        assert mem.read(0x1000, 4) == b"file"
        path.open("r+b").write(b"live")  # the guest writes: the mapping sees it at once
        assert mem.read(0, 4) == b"live"


def test_missing_memory_file_is_a_clear_error(tmp_path: object) -> None:
    from vims.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match="vims guest up"):
        PhysicalMemory.open(f"{tmp_path}/nope")


@settings(max_examples=60, deadline=None)
@given(
    vpage=st.integers(min_value=0, max_value=(1 << 35) - 1),
    ppage=st.integers(min_value=0x200, max_value=0x7FF),
    offset=st.integers(min_value=0, max_value=0xFFF),
    kernel_half=st.booleans(),
    levels=st.sampled_from([4, 5]),
)
def test_any_mapping_translates_back(vpage: int, ppage: int, offset: int, kernel_half: bool,
                                     levels: int) -> None:
    t = Tables(levels=levels)
    vbits = 57 if levels == 5 else 48
    vaddr = (vpage << 12) << (vbits - 48) if levels == 5 else vpage << 12
    vaddr &= (1 << (vbits - 1)) - 1
    if kernel_half:  # sign-extend into the upper half
        vaddr |= ((1 << 64) - 1) ^ ((1 << (vbits - 1)) - 1)
    t.map(vaddr, ppage << 12)
    assert t.space().translate(vaddr | offset) == (ppage << 12) | offset


def test_find_searches_each_region_at_its_physical_address() -> None:
    from vims.collector.memory import Region

    ram = bytearray(0x3000)
    ram[0x2100:0x2105] = b"Linux"  # file offset 0x2100 is physical 0x1_0000_0100 (second region)
    mem = PhysicalMemory(bytes(ram), [Region(0, 0, 0x2000), Region(1 << 32, 0x2000, 0x1000)])
    assert mem.find(b"Linux", 0, mem.end) == (1 << 32) + 0x100
    assert mem.find(b"Linux", 0, 0x2000) == -1


def test_pgd_base_drops_pcid_and_the_pti_user_bit() -> None:
    from vims.collector.memory import pgd_base

    kernel_copy = 0x3423E000
    assert pgd_base(kernel_copy) == kernel_copy
    assert pgd_base(kernel_copy | 0x1000 | 0x7) == kernel_copy  # user copy, PCID 7
