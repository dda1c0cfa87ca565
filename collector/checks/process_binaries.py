"""``process-binaries``: the code pages of running processes against the guest image's executables.

For each user process the kernel records its executable (``mm->exe_file``) and where that file's
code is mapped (``mm->start_code``..``end_code``). Each code page present in the process's page
tables is hashed (SHA-256) and compared with the hash of the same page of the file in the reference
root file system. Only present pages can be compared: pages the process never touched (or that were
reclaimed) are counted and reported, not read from anywhere else. An executable that is not in the
reference image fails: the image does not ship it.

The reference (:attr:`~vims.collector.checks.base.Reference.rootfs`) is a clean copy of the guest's
root file system: a directory, or an ext2/3/4 disk image read without mounting
(:class:`~vims.collector.reference_files.ReferenceFiles`). When it holds a dpkg database (a Debian
guest), each reference executable is first checked against the MD5 its package recorded
(``/var/lib/dpkg/info/*.md5sums``), so the pages are compared with what Debian shipped: a reference
file whose digest differs fails; one that no package lists cannot be vouched for, and its row is
an ``error`` (neither a pass nor a failure: the check could not judge it) unless its pages differ
from the image's copy, which fails.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vims.collector.checks.base import Check, Column, Context, Row
from vims.collector.kernel import KernelView
from vims.collector.memory import PAGE_SIZE, GuestMemoryError
from vims.collector.reference_files import Packaged, ReferenceFiles
from vims.errors import InputError

_EHDR = struct.Struct("<4s12xHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD, PF_X = 1, 1


@dataclass
class ElfText:
    """The executable segments of an ELF file: ``(vaddr, offset, filesz)`` each, and the file's bytes."""

    data: bytes
    segments: list[tuple[int, int, int]]
    hashes: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes, where: str) -> ElfText:
        """Read the program headers of ELF64 little-endian ``data`` (``where`` names it in errors)."""
        if len(data) < _EHDR.size or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise InputError("not a 64-bit little-endian ELF file", where=where)
        fields = _EHDR.unpack_from(data)
        phoff, phentsize, phnum = fields[5], fields[9], fields[10]
        segments = []
        for i in range(phnum):
            at = phoff + i * phentsize
            if at + _PHDR.size > len(data):
                raise InputError(f"program header {i} lies beyond the end of the file", where=where)
            p_type, p_flags, p_offset, p_vaddr, _, p_filesz, _, _ = _PHDR.unpack_from(data, at)
            if p_type == PT_LOAD and p_flags & PF_X:
                segments.append((p_vaddr, p_offset, p_filesz))
        return cls(data, segments)

    def page_hash(self, file_offset: int) -> bytes:
        """SHA-256 of the file page at ``file_offset`` as mmap shows it (zero-filled past the end)."""
        digest = self.hashes.get(file_offset)
        if digest is None:
            page = self.data[file_offset:file_offset + PAGE_SIZE]
            page += bytes(PAGE_SIZE - len(page))
            digest = self.hashes[file_offset] = hashlib.sha256(page).digest()
        return digest

    def file_offset(self, vaddr: int, bias: int) -> int | None:
        """The file offset of the page at run-time address ``vaddr`` (load bias ``bias``), if code."""
        for p_vaddr, p_offset, p_filesz in self.segments:
            lo = (p_vaddr + bias) & ~(PAGE_SIZE - 1)
            if lo <= vaddr < p_vaddr + bias + p_filesz:
                return vaddr - bias - p_vaddr + p_offset
        return None


@dataclass
class Executable:
    """A program's reference: its file in the reference tree and what the tree's package database says.

    Attributes
    ----------
    path : str
        The file's path in the tree, symlinks resolved.
    elf : ElfText
        Its executable segments.
    package : Packaged or None
        The package that installed it, when the tree has a dpkg database that lists it.
    shipped : bool or None
        Whether the file has the MD5 its package recorded (None when no package lists it).
    dpkg : bool
        Whether the tree has a dpkg database at all.
    """

    path: str
    elf: ElfText
    package: Packaged | None = None
    shipped: bool | None = None
    dpkg: bool = False

    @classmethod
    def load(cls, files: ReferenceFiles, exe: str) -> Executable | None:
        """The reference of the program the kernel names ``exe``; None if the tree has no ELF with code there."""
        found = files.read_file(exe)
        if found is None:
            return None
        path, data = found
        try:
            elf = ElfText.parse(data, path)
        except InputError:
            return None
        if not elf.segments:
            return None
        dpkg = bool(files.packaged())
        package, shipped = files.verify(path, data) if dpkg else (None, False)
        return cls(path, elf, package, shipped if package is not None else None, dpkg)


@dataclass
class _Seen:
    pids: list[int] = field(default_factory=list)
    compared: int = 0
    absent: int = 0
    #: ``(page address, pid, file offset)`` of each differing page.
    bad: list[tuple[int, int, int]] = field(default_factory=list)


class ProcessBinaries(Check):
    """The code pages of running programs match the guest image's executables (present pages only)."""

    name = "process-binaries"
    cost = "deep"
    symbols = ("init_task",)
    members = (("mm_struct", "exe_file"), ("mm_struct", "start_code"), ("mm_struct", "end_code"))
    #: A row is one executable: its ``path``, whether the reference image has it (``in_image``), how
    #: many processes run it, code pages compared / absent / differing, and the first differing page
    #: (``page``, the ``pid`` it was read in and its ``file_offset``; ``pid`` is the lowest pid when
    #: no page differs). On a reference with a dpkg database: the ``package`` that installed the file
    #: and whether the reference file is what it ``shipped`` (its MD5 in the package's md5sums);
    #: both empty when no package lists the file.
    columns = (Column("path"), Column("in_image", "bool"), Column("processes", "int"), Column("pid", "int"),
               Column("compared", "int"), Column("absent", "int"), Column("differing", "int"),
               Column("page", "hex"), Column("file_offset", "hex"), Column("package"), Column("shipped", "bool"))

    def run(self, ctx: Context) -> Iterator[Row]:
        rootfs = ctx.reference.rootfs
        if rootfs is None or not Path(rootfs).exists():
            yield self.row("rootfs", "error", "no reference root file system (build the guest image)")
            return
        with ReferenceFiles.open(rootfs) as files:
            yield from self._check(ctx.kernel, files)

    def _check(self, kernel: KernelView, files: ReferenceFiles) -> Iterator[Row]:
        refs: dict[str, Executable | None] = {}
        # One row per executable: pids, pages compared / absent / different.
        stats: dict[str, _Seen] = {}
        for task in kernel.tasks(exe=False):
            if not task.mm or task.cr3 is None:
                continue
            try:
                exe = kernel.exe_path(task.mm)
                start, end = kernel.code_range(task.mm)
            except GuestMemoryError:
                continue  # the process is exiting
            if exe is None or start >= end:
                continue
            s = stats.setdefault(exe, _Seen())
            s.pids.append(task.pid)
            if exe not in refs:
                refs[exe] = Executable.load(files, exe)
            ref = refs[exe]
            if ref is not None:
                self._compare(kernel, task, (start, end), ref.elf, s)
        for exe, s in sorted(stats.items()):
            yield self._row(exe, s, refs.get(exe))

    def _compare(self, kernel: KernelView, task: Any, code: tuple[int, int], elf: ElfText, s: _Seen) -> None:
        """Compare the present code pages of ``task`` (``code``: its start and end) with ``elf``'s."""
        start, end = code
        bias = start - min(v for v, _, _ in elf.segments)
        space = kernel.space(task.cr3)
        for page in range(start & ~(PAGE_SIZE - 1), end, PAGE_SIZE):
            offset = elf.file_offset(page, bias)
            if offset is None:
                continue
            try:
                paddr = space.translate(page)
                data = kernel.memory.view(paddr, PAGE_SIZE)
            except GuestMemoryError:
                s.absent += 1
                continue
            s.compared += 1
            if hashlib.sha256(data).digest() != elf.page_hash(offset) and \
                    self._still_differs(kernel, task.addr, task.mm, page, elf.page_hash(offset)):
                s.bad.append((page, task.pid, offset))

    def _row(self, exe: str, s: _Seen, ref: Executable | None) -> Row:
        """The row of executable ``exe``."""
        pids = ", ".join(map(str, sorted(s.pids)[:10])) + (", ..." if len(s.pids) > 10 else "")
        fields: dict[str, Any] = {"path": exe, "in_image": ref is not None, "processes": len(s.pids),
                                  "pid": min(s.pids)}
        if ref is None:
            return self.row(exe, "fail", f"not an executable of the reference image (pids {pids})", **fields)
        package = ref.package.package if ref.package is not None else None
        fields.update(compared=s.compared, absent=s.absent, differing=len(s.bad), package=package,
                      shipped=ref.shipped)
        counts = f"{s.compared} code pages compared, {s.absent} not present in the page tables"
        unshipped = (f"the reference image's {ref.path} is not what package {package} shipped (its MD5 "
                     f"differs from {package}.md5sums)")
        if s.bad:
            page, pid, offset = s.bad[0]
            fields.update(page=page, pid=pid, file_offset=offset)
            bad = [f"{p:#x} (pid {t}, file offset {o:#x})" for p, t, o in s.bad]
            shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            also = f"; and {unshipped}" if ref.shipped is False else ""
            return self.row(exe, "fail", f"{len(bad)} code pages differ from the reference: {shown} "
                            f"({counts}; pids {pids}){also}", **fields)
        if ref.shipped is False:
            return self.row(exe, "fail", f"{unshipped} ({counts}; pids {pids})", **fields)
        if ref.dpkg and ref.package is None:
            return self.row(exe, "error", f"no package lists {ref.path} in /var/lib/dpkg/info/*.md5sums: "
                            f"nothing vouches for the image's copy, which the pages match ({counts}; pids {pids})",
                            **fields)
        shipped = f"; the file is as package {package} shipped it" if package is not None else ""
        return self.row(exe, "pass", f"{counts}; all match (pids {pids}){shipped}", **fields)

    @staticmethod
    def _still_differs(kernel: KernelView, task: int, mm: int, page: int, expected: bytes) -> bool:
        """Read a differing page again: the process may have exec'd or exited, the page been reused."""
        try:
            if kernel.u64(task + kernel._offsets.mm) != mm:
                return False
            space = kernel.space(kernel.task(task).cr3 or 0)
            return hashlib.sha256(kernel.memory.view(space.translate(page), PAGE_SIZE)).digest() != expected
        except GuestMemoryError:
            return False
