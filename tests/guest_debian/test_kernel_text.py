"""kernel-text on the Debian guest: the reference built from its own vmlinuz holds under KASLR, with
PTI on and off, across CPU models and across boots; one byte written into the text fails, named by
its function, and passes again once restored."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from vims.collector.backends import QemuBackend
from vims.collector.checks import Context, registry, run_checks
from vims.collector.gdbstub import GdbStub
from vims.collector.guest import Guest
from vims.collector.guest.debian import DebianImage
from vims.collector.kernel_image import KernelImage

#: A function nothing in the guest calls while the tests run.
QUIET_FUNCTION = "__x64_sys_vhangup"


def kernel_text(guest: Guest) -> list[Any]:
    """The kernel-text rows of ``guest``, its context built as the A-VM builds it."""
    with QemuBackend.from_guest(guest) as backend:
        return run_checks(Context.of_guest(backend), [registry()["kernel-text"]()])


def failures(rows: list[Any]) -> list[Any]:
    return [r for r in rows if r.status != "pass"]


def offset(guest: Guest) -> int:
    return int(guest.profile.metadata["kaslr"]["virtual_offset"])


def test_a_clean_guest_matches_its_kernel_image(any_debian: Guest) -> None:
    rows = kernel_text(any_debian)
    assert not failures(rows), failures(rows)
    assert [r.target for r in rows] == ["runtime patch sites", "kernel text"]
    # The kernel patched itself at boot (KASLR relocations aside): those sites were each checked.
    patched = rows[0].detail
    for kind in ("alternatives", "ftrace sites", "return sites", "static calls"):
        assert kind in patched, patched


def test_a_byte_written_into_kernel_text_fails_naming_the_function(any_debian: Guest) -> None:
    with QemuBackend.from_guest(any_debian) as backend:
        ctx = Context.of_guest(backend)
        check = registry()["kernel-text"]()
        assert not failures(run_checks(ctx, [check]))  # the clean text is remembered ...
        addr = ctx.profile.symbol(QUIET_FUNCTION) + 0x10
        with GdbStub(*any_debian.gdb_address) as gdb:
            gdb.halt()
            try:
                original = gdb.read(addr, 1)
                gdb.write(addr, bytes([original[0] ^ 0xFF]))
                try:
                    rows = run_checks(ctx, [check])  # ... and a change to it is not taken on trust
                finally:
                    gdb.write(addr, original)
                assert gdb.read(addr, 1) == original
                after = run_checks(ctx, [check])
            finally:
                gdb.resume()
    bad = failures(rows)
    assert len(bad) == 1 and bad[0].status == "fail", rows
    assert bad[0].target == QUIET_FUNCTION
    assert f"{QUIET_FUNCTION}+0x10 (1 bytes)" in bad[0].detail
    assert bad[0].fields == {"page": addr & ~0xFFF, "symbol": QUIET_FUNCTION, "offset": 0x10, "address": addr,
                             "changes": 1, "bytes": 1}
    assert not failures(after), failures(after)


def test_the_same_image_passes_under_two_cpu_models_and_two_boots(debian: Guest, debian_qemu64: Guest) -> None:
    qemu64 = debian_qemu64
    assert (debian.state["cpu"], qemu64.state["cpu"]) == ("max", "qemu64")
    patched = []
    for guest in (debian, qemu64):
        rows = kernel_text(guest)
        assert not failures(rows), (guest.state["cpu"], failures(rows))
        patched.append(rows[0].detail)
    # Under each model the kernel patched itself differently (other alternatives, other mitigations).
    assert patched[0] != patched[1], patched
    if offset(debian) == offset(qemu64):
        pytest.skip("both boots drew the same KASLR slot (1 in 512): the reboot half was not shown")


def test_the_relocation_table_fills_the_payload_after_the_elf_file(debian_image: DebianImage) -> None:
    image = KernelImage.from_vmlinuz(debian_image.kernel)
    rel = image.relocations
    assert len(rel.r32) > 10_000 and len(rel.r64) > 10_000 and len(rel.inverse32) > 1_000
    text = image.section(".text")
    inside = (rel.r32 >= np.uint64(text.addr)) & (rel.r32 < np.uint64(text.addr + text.size))
    assert inside.sum() > 1_000  # absolute addresses in code (``mov $sym, %reg``) are relocated


def test_a_patch_site_holding_a_foreign_state_fails(debian: Guest) -> None:
    """A return site or an ftrace site is checked for the kernel's states, not skipped: a jump to
    another function there fails, named by the function the site is in."""
    evil = debian.profile.symbol(QUIET_FUNCTION)
    with QemuBackend.from_guest(debian) as backend:
        ctx = Context.of_guest(backend)
        check = registry()["kernel-text"]()
        assert not failures(run_checks(ctx, [check]))
        sites = ctx.memo["kernel-text"].sites
        writes = []
        for kind in (sites.returns, sites.mcount):
            addr = sites.address(int(kind[len(kind) // 2]))
            writes.append((addr, b"\xe9" + struct.pack("<i", evil - addr - 5)))
        with GdbStub(*debian.gdb_address) as gdb:
            gdb.halt()
            try:
                originals = [gdb.read(addr, 5) for addr, _ in writes]
                try:
                    for addr, code in writes:
                        gdb.write(addr, code)
                    rows = run_checks(ctx, [check])
                finally:
                    for (addr, _), code in zip(writes, originals, strict=True):
                        gdb.write(addr, code)
                after = run_checks(ctx, [check])
            finally:
                gdb.resume()
    bad = failures(rows)
    named = {ctx.profile.symbol_at(addr)[0] for addr, _ in writes}
    assert {r.fields["symbol"] for r in bad} == named, bad
    assert all(r.status == "fail" and r.fields["bytes"] <= 5 for r in bad)
    assert not failures(after), failures(after)


#: ``X86_FEATURE_SMAP`` (word 9, bit 20): QEMU's ``max`` CPU has it, so ``stac``/``clac`` are patched in.
SMAP = 9 * 32 + 20


def test_an_alternative_reverted_to_the_image_fails(debian: Guest) -> None:
    """Writing back the image's own bytes at one SMAP site (``clac`` turned back into NOPs: a real
    attack, it opens user memory to the kernel) is a choice no CPU makes together with the other
    SMAP sites: it fails, named by the function, though the bytes are the image's."""
    with QemuBackend.from_guest(debian) as backend:
        ctx = Context.of_guest(backend)
        check = registry()["kernel-text"]()
        assert not failures(run_checks(ctx, [check]))
        ref = ctx.memo["kernel-text"]
        sites, alt = ref.sites, ref.sites.alt
        current = np.frombuffer(backend.kernel.read(sites.start, sites.n), np.uint8)
        for j in np.flatnonzero(alt["cpuid"] == SMAP).tolist():
            i, size = int(alt["instr"][j] + sites._to_index), int(alt["instrlen"][j])
            if 0 <= i < sites.n and bytes(current[i:i + size]) != bytes(ref.text[i:i + size]):
                break
        else:
            pytest.skip("no SMAP site patched in this guest (a CPU without SMAP?)")
        addr, image_bytes = sites.address(i), bytes(ref.text[i:i + size])
        with GdbStub(*debian.gdb_address) as gdb:
            gdb.halt()
            try:
                original = gdb.read(addr, size)
                gdb.write(addr, image_bytes)
                try:
                    rows = run_checks(ctx, [check])
                finally:
                    gdb.write(addr, original)
                after = run_checks(ctx, [check])
            finally:
                gdb.resume()
    bad = failures(rows)
    assert [r.fields["symbol"] for r in bad] == [ctx.profile.symbol_at(addr)[0]], bad
    assert bad[0].fields["address"] == addr
    assert not failures(after), failures(after)
