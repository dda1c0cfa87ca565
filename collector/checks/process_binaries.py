"""``process-binaries``: the code pages of running processes against the guest image's executables.

For each user process the kernel records its executable (``mm->exe_file``) and where that file's
code is mapped (``mm->start_code``..``end_code``). Each code page present in the process's page
tables is hashed (SHA-256) and compared with the hash of the same page of the file in the reference
root file system. Only present pages can be compared: pages the process never touched (or that were
reclaimed) are counted and reported, not read from anywhere else. An executable that is not in the
reference image fails: the image does not ship it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vims.collector.checks.base import Check, Column, Context, Row
from vims.collector.kernel import KernelView
from vims.collector.memory import PAGE_SIZE, GuestMemoryError

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
        from vims.errors import InputError

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
class _Seen:
    pids: list[int] = field(default_factory=list)
    compared: int = 0
    absent: int = 0
    #: ``(page address, pid, file offset)`` of each differing page.
    bad: list[tuple[int, int, int]] = field(default_factory=list)


def rootfs_file(rootfs: Path, path: str) -> Path | None:
    """``path`` inside the tree ``rootfs``, following symlinks within it (absolute ones too)."""
    current = rootfs
    parts = [p for p in path.split("/") if p]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != rootfs else rootfs
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = str(candidate.readlink())
            parts = [p for p in target.split("/") if p] + parts
            current = rootfs if target.startswith("/") else current
            continue
        current = candidate
    return current if current.is_file() else None


class ProcessBinaries(Check):
    """The code pages of running programs match the guest image's executables (present pages only)."""

    name = "process-binaries"
    cost = "deep"
    symbols = ("init_task",)
    members = (("mm_struct", "exe_file"), ("mm_struct", "start_code"), ("mm_struct", "end_code"))
    #: A row is one executable: its ``path``, whether the reference image has it (``in_image``), how
    #: many processes run it, code pages compared / absent / differing, and the first differing page
    #: (``page``, the ``pid`` it was read in and its ``file_offset``; ``pid`` is the lowest pid when
    #: no page differs).
    columns = (Column("path"), Column("in_image", "bool"), Column("processes", "int"), Column("pid", "int"),
               Column("compared", "int"), Column("absent", "int"), Column("differing", "int"),
               Column("page", "hex"), Column("file_offset", "hex"))

    def run(self, ctx: Context) -> Iterator[Row]:
        rootfs = ctx.reference.rootfs
        if rootfs is None or not Path(rootfs).is_dir():
            yield self.row("rootfs", "error", "no reference root file system (build the guest image)")
            return
        kernel = ctx.kernel
        elves: dict[str, ElfText | None] = {}
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
            if exe not in elves:
                elves[exe] = self._load(Path(rootfs), exe)
            elf = elves[exe]
            if elf is None:
                continue
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
        for exe, s in sorted(stats.items()):
            yield self._row(exe, s, elves.get(exe) is not None)

    def _row(self, exe: str, s: _Seen, in_image: bool) -> Row:
        """The row of executable ``exe``."""
        pids = ", ".join(map(str, sorted(s.pids)[:10])) + (", ..." if len(s.pids) > 10 else "")
        fields = {"path": exe, "in_image": in_image, "processes": len(s.pids), "pid": min(s.pids)}
        if not in_image:
            return self.row(exe, "fail", f"not an executable of the reference image (pids {pids})", **fields)
        fields.update(compared=s.compared, absent=s.absent, differing=len(s.bad))
        counts = f"{s.compared} code pages compared, {s.absent} not present in the page tables"
        if not s.bad:
            return self.row(exe, "pass", f"{counts}; all match (pids {pids})", **fields)
        page, pid, offset = s.bad[0]
        fields.update(page=page, pid=pid, file_offset=offset)
        bad = [f"{p:#x} (pid {t}, file offset {o:#x})" for p, t, o in s.bad]
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        return self.row(exe, "fail", f"{len(bad)} code pages differ from the reference: {shown} "
                        f"({counts}; pids {pids})", **fields)

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

    @staticmethod
    def _load(rootfs: Path, exe: str) -> ElfText | None:
        path = rootfs_file(rootfs, exe)
        if path is None:
            return None
        data = path.read_bytes()
        try:
            elf = ElfText.parse(data, str(path))
        except Exception:
            return None
        return elf if elf.segments else None
