"""The static integrity checks on the real guest: clean passes; each kind of tampering fails its check,
naming what was changed. Every test restores what it changes (the guest is shared by the whole run):
writes through the GDB stub are made and undone while the guest is halted, the scenario is undone
with ``guest.reset()``."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from vims.collector.backends import QemuBackend
from vims.collector.checks import Context, Reference, registry, run_checks
from vims.collector.checks.kernel_text import NOP5
from vims.collector.gdbstub import GdbStub
from vims.collector.kernel_image import KernelImage
from vims.syscalls import names as syscall_names

#: A function nothing in the guest calls while the tests run.
QUIET_FUNCTION = "__x64_sys_vhangup"


@pytest.fixture
def ctx(guest: Any, guest_image: Any) -> Iterator[Context]:
    with QemuBackend.from_guest(guest) as backend:
        yield Context(backend, Reference.from_image(guest_image), cpu=guest.state["cpu"])


def run(ctx: Context, name: str) -> list[Any]:
    return run_checks(ctx, [registry()[name]()])


def failures(rows: list[Any]) -> list[Any]:
    return [r for r in rows if r.status != "pass"]


@contextmanager
def halted(guest: Any) -> Iterator[GdbStub]:
    """The guest stopped (nothing runs while text or tables are changed and restored)."""
    with GdbStub(*guest.gdb_address) as gdb:
        gdb.halt()
        try:
            yield gdb
        finally:
            gdb.resume()


@contextmanager
def patched(gdb: GdbStub, addr: int, data: bytes) -> Iterator[bytes]:
    """Write ``data`` at ``addr`` through the stub; put the original bytes back afterwards."""
    original = gdb.read(addr, len(data))
    gdb.write(addr, data)
    try:
        yield original
    finally:
        gdb.write(addr, original)
        assert gdb.read(addr, len(data)) == original


def test_a_clean_guest_passes_every_check(ctx: Context) -> None:
    rows = run_checks(ctx, [c() for c in registry().values()])
    assert {r.check for r in rows} == set(registry())
    assert not failures(rows), failures(rows)


def test_the_kernel_image_reference_holds_for_any_cpu_model(ctx: Context) -> None:
    """The reference is the kernel image and its patch sites, not a snapshot of one CPU's boot."""
    ctx.cpu = "qemu64"
    rows = run(ctx, "kernel-text")
    assert not failures(rows), failures(rows)
    assert rows[-1].target == "kernel text" and "match the kernel image" in rows[-1].detail


def test_without_a_kernel_image_kernel_text_is_an_error_not_a_failure(ctx: Context) -> None:
    ctx.reference = Reference(rootfs=ctx.reference.rootfs)
    rows = run(ctx, "kernel-text")
    assert [(r.status, r.target) for r in rows] == [("error", "kernel text")]
    assert "no kernel image" in rows[0].detail


def test_a_write_into_kernel_text_fails_naming_the_function(guest: Any, ctx: Context) -> None:
    addr = ctx.profile.symbol(QUIET_FUNCTION) + 0x10
    with halted(guest) as gdb:
        original = gdb.read(addr, 1)
        with patched(gdb, addr, bytes([original[0] ^ 0xFF])):
            rows = run(ctx, "kernel-text")
        after = run(ctx, "kernel-text")
    bad = failures(rows)
    assert len(bad) == 1 and bad[0].status == "fail"
    assert bad[0].target == QUIET_FUNCTION
    assert f"{QUIET_FUNCTION}+0x10 (1 bytes)" in bad[0].detail
    assert bad[0].fields == {"page": addr & ~0xFFF, "symbol": QUIET_FUNCTION, "offset": 0x10, "address": addr,
                             "changes": 1, "bytes": 1}
    assert not failures(after)


def test_a_flipped_jump_label_is_the_kernels_own_patching(guest: Any, ctx: Context) -> None:
    """A static key switched at run time changes text: that must not fail the check."""
    profile, kernel = ctx.profile, ctx.kernel
    assert ctx.reference.kernel_image is not None
    image = KernelImage.from_vmlinuz(ctx.reference.kernel_image)  # this guest boots with nokaslr
    lo, hi = profile.symbol("__start___jump_table"), profile.symbol("__stop___jump_table")
    table = kernel.read(lo, hi - lo)
    for i in range(0, len(table), 16):
        code, target, _ = struct.unpack_from("<iiq", table, i)
        site, dest = lo + i + code, lo + i + 4 + target
        # A NOP now and in the image: the jump written below is a new change to account for.
        if kernel.read(site, 5) == NOP5 == image.read(site, 5) and -(2**31) < dest - site - 5 < 2**31:
            break
    else:
        pytest.skip("no 5-byte NOP jump-label site in this kernel")
    jump = b"\xe9" + struct.pack("<i", dest - site - 5)
    before = run(ctx, "kernel-text")
    with halted(guest) as gdb, patched(gdb, site, jump):
        rows = run(ctx, "kernel-text")
    assert not failures(rows), failures(rows)
    # One more site holds the kernel's own patching than before: the flipped jump label.
    assert jump_labels(rows) == jump_labels(before) + 1
    assert all(r.fields["changes"] >= 1 for r in rows if r.target == "runtime patch sites")


def jump_labels(rows: list[Any]) -> int:
    """How many jump-label sites the runtime-patch row counts (0 when there is no such row)."""
    for r in rows:
        found = re.search(r"(\d+) jump labels", r.detail or "") if r.target == "runtime patch sites" else None
        if found:
            return int(found.group(1))
    return 0


def test_a_changed_syscall_table_entry_fails_naming_the_syscall(guest: Any, ctx: Context) -> None:
    nr = syscall_names().index("vhangup")
    entry = ctx.profile.symbol("sys_call_table") + 8 * nr
    evil = ctx.profile.symbol("__x64_sys_ni_syscall")
    with halted(guest) as gdb, patched(gdb, entry, struct.pack("<Q", evil)):
        rows = run(ctx, "syscall-table")
    bad = failures(rows)
    assert [r.target for r in bad] == [f"vhangup ({nr})"]
    assert "__x64_sys_ni_syscall" in bad[0].detail and "not __x64_sys_vhangup" in bad[0].detail
    assert bad[0].fields == {"nr": nr, "syscall": "vhangup", "entry": evil, "points_to": "__x64_sys_ni_syscall",
                             "expected": "__x64_sys_vhangup",
                             "expected_entry": ctx.profile.symbol("__x64_sys_vhangup")}
    assert not failures(run(ctx, "syscall-table"))


def test_a_hidden_process_is_found(guest: Any, ctx: Context) -> None:
    """Unlink httpd from the task list, as a rootkit would: the pid allocator still knows it."""
    kernel = ctx.kernel
    httpd = next(t for t in kernel.tasks() if t.comm == "httpd")
    node = httpd.addr + ctx.profile.offset("task_struct", "tasks")
    nxt, prev = kernel.u64(node), kernel.u64(node + 8)
    with halted(guest) as gdb, patched(gdb, prev, struct.pack("<Q", nxt)), \
            patched(gdb, nxt + 8, struct.pack("<Q", prev)):
        assert httpd.pid not in {t.pid for t in kernel.tasks()}
        rows = run(ctx, "hidden-processes")
    assert [r.target for r in failures(rows)] == [f"pid {httpd.pid} (httpd)"]
    assert failures(rows)[0].fields == {"pid": httpd.pid, "comm": "httpd", "task": httpd.addr,
                                        "seen_in": "init_pid_ns", "missing_from": "task list"}
    assert not failures(run(ctx, "hidden-processes"))


def test_the_tamper_scenario_fails_naming_the_program(guest: Any, guest_image: Any, ctx: Context) -> None:
    program = guest_image.tamper["program"]
    try:
        guest.scenario("tamper-binary")
        rows = run(ctx, "process-binaries")
    finally:
        guest.reset()
    bad = failures(rows)
    assert [r.target for r in bad] == [program], rows
    assert "1 code pages differ from the reference" in bad[0].detail
    found = bad[0].fields
    assert (found["path"], found["in_image"], found["differing"]) == (program, True, 1)
    assert found["page"] is not None and found["file_offset"] is not None
    assert f"{found['page']:#x} (pid {found['pid']}, file offset {found['file_offset']:#x})" in bad[0].detail
    assert not failures(run(ctx, "process-binaries"))


def test_vims_check_command(guest: Any, tmp_path: Path) -> None:
    """`vims check --json` on a detached-style guest: found by name through its state file."""
    if not guest.state.get("detached"):
        # the session guest is not detached: give the command a state file of its own to find it by
        from vims.collector.guest.qemu import run_root

        state = run_root() / f"check-test-{guest.name}.json"
        state.write_text(json.dumps({**guest.state, "name": state.stem}))
        name = state.stem
    else:
        state, name = None, guest.name
    try:
        done = subprocess.run([sys.executable, "-m", "vims.cli", "check", "--json", "--name", name,
                               "--light", "-o", str(tmp_path / "checks.parquet")],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr + done.stdout
        rows = json.loads(done.stdout)
        assert {r["check"] for r in rows} == {name for name, c in registry().items() if c.cost == "light"}
        assert "process-binaries" not in {r["check"] for r in rows}  # the deep one, left out by --light
        for r in rows:  # each row shows its check's declared columns
            assert list(r["fields"]) == [c.name for c in registry()[r["check"]].columns]
        from vims.schemas import CHECK_SCHEMA
        from vims.tables import read_table

        assert read_table(tmp_path / "checks.parquet", CHECK_SCHEMA).num_rows == len(rows)
        bad = subprocess.run([sys.executable, "-m", "vims.cli", "check", "--name", "no-such-guest"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "no guest named 'no-such-guest'" in bad.stderr
    finally:
        if state is not None:
            state.unlink()
