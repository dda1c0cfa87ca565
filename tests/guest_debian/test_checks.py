"""syscall-table, hidden-processes and process-binaries on the real Debian guest (KASLR, 2 vCPUs, PTI
off and on). The reference of process-binaries is the clean image's own ``disk.img`` (the guest boots it
with ``snapshot=on``, so the file stays as built), read without mounting and checked against the dpkg
md5sums inside it. Every test restores what it changes: the guest is shared by the whole run.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.guest_debian.halting import halted_in_kernel
from vims.collector.backends import QemuBackend
from vims.collector.checks import Context, Reference, registry, run_checks
from vims.collector.checks.process_binaries import ElfText
from vims.collector.guest import Guest
from vims.collector.guest.debian import DebianImage
from vims.collector.memory import PAGE_SIZE
from vims.collector.reference_files import ReferenceFiles
from vims.syscalls import names as syscall_names

CHECKS = ("syscall-table", "hidden-processes", "process-binaries")
#: The packaged program the tamper test patches on the guest's disk and keeps running.
TOOL = "/usr/bin/sleep"
#: Padding after a ``ret`` (``c3`` then a multi-byte NOP): never executed, so the patched tool still runs.
PADDING = (b"\xc3\x66\x2e\x0f\x1f\x84\x00", b"\xc3\x0f\x1f\x80\x00\x00", b"\xc3\x0f\x1f\x44\x00\x00",
           b"\xc3\x66\x0f\x1f\x44\x00\x00", b"\xc3\x0f\x1f\x40\x00")


@contextmanager
def checks_of(guest: Guest, image: DebianImage) -> Iterator[Context]:
    """The checks' context on ``guest``, with the clean disk image as the reference file system."""
    with QemuBackend.from_guest(guest) as backend:
        yield Context(backend, Reference(rootfs=image.disk), cpu=guest.state.get("cpu"))


def run(ctx: Context, name: str) -> list[Any]:
    return run_checks(ctx, [registry()[name]()])


def failures(rows: list[Any]) -> list[Any]:
    return [r for r in rows if r.status != "pass"]


def test_a_clean_debian_guest_passes(any_debian: Guest, debian_image: DebianImage) -> None:
    with checks_of(any_debian, debian_image) as ctx:
        rows = run_checks(ctx, [registry()[name]() for name in CHECKS])
    assert {r.check for r in rows} == set(CHECKS)
    assert not failures(rows), failures(rows)
    programs = {r.fields["path"]: r.fields for r in rows if r.check == "process-binaries"}
    for path, package in [("/usr/lib/systemd/systemd", "systemd"), ("/usr/sbin/sshd", "openssh-server"),
                          ("/usr/sbin/nginx", "nginx"), ("/usr/sbin/cron", "cron")]:
        assert programs[path]["package"] == package and programs[path]["shipped"] is True, programs[path]
        assert programs[path]["compared"] > 0 and programs[path]["differing"] == 0
    tasks = next(r for r in rows if r.check == "hidden-processes")
    assert int(tasks.detail.split()[0]) > 50  # kernel threads of both CPUs, services, their threads
    assert "all 4" in next(r.detail for r in rows if r.check == "syscall-table")  # 4xx entries


def test_a_changed_syscall_table_entry_fails_naming_the_syscall(any_debian: Guest,
                                                                debian_image: DebianImage) -> None:
    nr = syscall_names().index("vhangup")
    with checks_of(any_debian, debian_image) as ctx:
        entry = ctx.profile.symbol("sys_call_table") + 8 * nr  # relocated: this boot's KASLR offset
        evil = ctx.profile.symbol("__x64_sys_ni_syscall")
        with halted_in_kernel(any_debian) as (gdb, vcpu):
            original = gdb.read(entry, 8, vcpu)
            assert struct.unpack("<Q", original)[0] == ctx.profile.symbol("__x64_sys_vhangup")
            gdb.write(entry, struct.pack("<Q", evil), vcpu)
            try:
                rows = run(ctx, "syscall-table")
            finally:
                gdb.write(entry, original, vcpu)
                assert gdb.read(entry, 8, vcpu) == original
        after = run(ctx, "syscall-table")
    bad = failures(rows)
    assert [r.target for r in bad] == [f"vhangup ({nr})"]
    assert "__x64_sys_ni_syscall" in bad[0].detail and "not __x64_sys_vhangup" in bad[0].detail
    assert bad[0].fields == {"nr": nr, "syscall": "vhangup", "entry": evil, "points_to": "__x64_sys_ni_syscall",
                             "expected": "__x64_sys_vhangup",
                             "expected_entry": ctx.profile.symbol("__x64_sys_vhangup")}
    assert not failures(after)


def padding_in_entry_page(data: bytes) -> tuple[int, int]:
    """The file offset of the ELF's entry page, and of a padding byte in it that no code runs."""
    elf = ElfText.parse(data, TOOL)
    entry = struct.unpack_from("<Q", data, 24)[0]
    page = elf.file_offset(entry & ~(PAGE_SIZE - 1), 0)
    assert page is not None
    text = data[page:page + PAGE_SIZE]
    for pattern in PADDING:
        at = text.find(pattern)
        if at >= 0:
            return page, page + at + 2
    pytest.skip(f"no padding after a ret in the entry page of {TOOL}")


def test_a_modified_packaged_binary_is_named(debian: Guest, debian_image: DebianImage) -> None:
    """A byte of sleep's text patched on the guest's disk, the tool run: its row fails with the page."""
    with ReferenceFiles.open(debian_image.disk) as files:
        found = files.read_file(TOOL)
        shipped = files.packaged()[TOOL].md5
    assert found is not None
    page, at = padding_in_entry_page(found[1])
    byte = found[1][at] ^ 0xFF
    write = f"printf '\\{byte:03o}' | dd of={TOOL} bs=1 seek={at} conv=notrunc status=none"
    restore = f"printf '\\{found[1][at]:03o}' | dd of={TOOL} bs=1 seek={at} conv=notrunc status=none"
    pid = 0
    try:
        debian.run(write, check=True)
        pid = int(debian.run(f"setsid nohup {TOOL} 600 >/dev/null 2>&1 </dev/null & echo $!", check=True))
        assert debian.run(f"kill -0 {pid} && echo alive").strip() == "alive"
        with checks_of(debian, debian_image) as ctx:
            rows = run(ctx, "process-binaries")
    finally:
        if pid:  # a running program's file cannot be written (ETXTBSY): wait until it has gone
            debian.run(f"kill {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.1; done")
        debian.run(restore, check=True)
    bad = failures(rows)
    assert [r.target for r in bad] == [TOOL], bad
    found_row = bad[0].fields
    assert (found_row["path"], found_row["in_image"], found_row["differing"]) == (TOOL, True, 1)
    assert (found_row["package"], found_row["shipped"], found_row["file_offset"]) == ("coreutils", True, page)
    assert found_row["pid"] == pid
    assert f"1 code pages differ from the reference: {found_row['page']:#x} (pid {pid}, file offset {page:#x})" \
        in bad[0].detail
    assert debian.run(f"md5sum {TOOL}").split()[0] == shipped  # restored
    with checks_of(debian, debian_image) as ctx:
        assert not failures(run(ctx, "process-binaries"))


def test_a_running_process_hidden_from_list_and_pids_is_seen_on_its_cpu(debian: Guest,
                                                                       debian_image: DebianImage) -> None:
    """A busy loop unlinked from the task list and from its struct pid, as a thorough rootkit would:
    the runqueue of the CPU that runs it still names it."""
    loop = "setsid nohup sh -c 'while :; do :; done' >/dev/null 2>&1 </dev/null & echo $!"
    pid = int(debian.run(loop, check=True))
    try:  # setsid and nohup exec the shell: wait until it runs under its own name
        debian.run(f"for i in $(seq 100); do [ \"$(ps -o comm= -p {pid})\" = sh ] && break; sleep 0.1; done")
        with checks_of(debian, debian_image) as ctx:
            kernel, profile = ctx.kernel, ctx.profile
            task = next(t for t in kernel.tasks() if t.pid == pid)
            node = task.addr + profile.offset("task_struct", "tasks")
            nxt, prev = kernel.u64(node), kernel.u64(node + 8)
            first = kernel.u64(task.addr + profile.offset("task_struct", "thread_pid")) \
                + profile.offset("pid", "tasks")
            for _ in range(50):  # until the guest stops with the loop on a CPU
                with halted_in_kernel(debian) as (gdb, vcpu):
                    if pid not in registry()["hidden-processes"].running(kernel):
                        continue
                    writes = [(prev, struct.pack("<Q", nxt)), (nxt + 8, struct.pack("<Q", prev)),
                              (first, bytes(8))]
                    originals = [gdb.read(addr, 8, vcpu) for addr, _ in writes]
                    try:
                        for addr, data in writes:
                            gdb.write(addr, data, vcpu)
                        rows = run(ctx, "hidden-processes")
                    finally:
                        for (addr, _), data in zip(writes, originals, strict=True):
                            gdb.write(addr, data, vcpu)
                    break
            else:
                pytest.fail(f"the busy loop (pid {pid}) was not on a CPU in 50 stops")
            after = run(ctx, "hidden-processes")
    finally:
        debian.run(f"kill {pid}")
    bad = failures(rows)
    assert [r.target for r in bad] == [f"pid {pid} (sh)"], bad
    assert bad[0].fields["seen_in"].startswith("runqueue of CPU ") and bad[0].fields["task"] == task.addr
    assert bad[0].fields["missing_from"] == "task list"
    assert not failures(after)
