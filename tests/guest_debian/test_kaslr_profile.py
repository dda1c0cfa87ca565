"""KASLR offsets and the kernel profile, found without the guest and checked against what it says."""

from __future__ import annotations

from vims.collector.guest import Guest
from vims.collector.kaslr import find_kaslr
from vims.collector.profile import KernelProfile, parse_kallsyms

#: Symbols the readers and checks rely on.
NEEDED = (
    "_text", "_stext", "_etext", "init_task", "sys_call_table", "entry_SYSCALL_64", "current_task",
    "cpu_tss_rw", "page_offset_base", "init_top_pgt", "linux_banner", "__per_cpu_offset",
)  # fmt: skip


def _proc_kallsyms(guest: Guest) -> dict[str, int]:
    text = guest.run("grep -v '\\[' /proc/kallsyms", timeout=60, check=True)
    return {name: int(sym["address"]) for name, sym in parse_kallsyms(text).items()}


def test_kaslr_offsets_match_the_guests_own_addresses(any_debian: Guest) -> None:
    raw = KernelProfile.load(any_debian.profile_path)
    assert raw.relocatable
    found = find_kaslr(any_debian.memory_path, raw, gdb=any_debian.gdb_address)
    assert found.how == ["banner", "phys_base", "init_top_pgt", "cr3"]
    proc = _proc_kallsyms(any_debian)
    assert found.text_vaddr == proc["_text"]
    assert found.virtual_offset == proc["_text"] - raw.symbol("_text")
    iomem = any_debian.run("grep 'Kernel code' /proc/iomem", check=True)
    assert int(iomem.split("-")[0].strip(), 16) == found.text_paddr


def test_every_symbol_from_the_image_matches_proc_kallsyms(debian: Guest) -> None:
    proc = _proc_kallsyms(debian)
    mine = debian.profile.symbols()
    assert len(proc) > 50_000
    for name in NEEDED:
        assert mine[name] == proc[name], name
    wrong = [n for n, a in proc.items() if mine.get(n) != a]
    assert wrong == []
