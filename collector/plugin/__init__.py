"""The QEMU TCG plugin ``vims_syscall`` (``vims_syscall.c`` here): where it and its QEMU are, and its
shared-memory rings.

``scripts/qemu-plugin-setup.sh`` (run by ``make setup``) builds the plugin into
``~/.cache/vims/plugin/vims_syscall.so`` and names the QEMU (10 or newer) it runs in, in
``~/.cache/vims/plugin/qemu-binary``: on Debian 12, QEMU 10 from bookworm-backports unpacked into
``~/.cache/vims/qemu10`` (the system's QEMU 7.2 cannot read registers from a plugin and is left alone).

The shared memory (one file in ``/dev/shm``, created by the plugin at QEMU's start) is laid out as the
C file says: a 4096-byte header with the control area, then per vCPU a 64-byte ring header (``head``
written by the plugin, ``tail`` by the collector, ``dropped``, ``seen``, ``capped``, ``filtered``) and ``slots``
records of 376 bytes (:data:`RECORD_DTYPE`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vims.errors import MissingDependencyError, VimsError
from vims.paths import cache_dir

__all__ = ["CALL_NUMBERS", "RECORD_DTYPE", "PluginInstall", "Rings", "find_plugin", "plugin_filters"]

MAGIC = 0x31474C50534D4956  # "VIMSPLG1"
VERSION = 4
HEADER_SIZE = 4096
RING_HEADER = 64
#: One record, as the plugin writes it (``struct record``).
RECORD_DTYPE = np.dtype([
    ("ts_ns", "<u8"), ("nr", "<u8"), ("args", "<u8", (6,)), ("ip", "<u8"), ("sp", "<u8"), ("cr3", "<u8"),
    ("task", "<u8"), ("kgs", "<u8"), ("flags", "<u8"), ("pid", "<u4"), ("tgid", "<u4"), ("comm", "S16"),
    ("ppid", "<u4"), ("ppid_pad", "<u4"), ("reserved", "<u8"), ("path", "S96"), ("argv", "S128"),
])  # fmt: skip
assert RECORD_DTYPE.itemsize == 376
#: Header fields: (offset, struct format).
_ENABLED, _REGS_OK, _TASK_OFFSET, _CAP, _GENERATION, _MISSING = (24, "<I"), (28, "<I"), (32, "<Q"), (40, "<Q"), \
    (48, "<Q"), 56
_PID_OFFSET, _TGID_OFFSET, _COMM_OFFSET = (120, "<Q"), (128, "<Q"), (136, "<Q")
#: Per call number (0-511): 1 + the argument holding a path / argv (0: none).
_PATH_ARG, _ARGV_ARG = 144, 656
#: The program filter: a sequence number (odd while written), the include and exclude counts, then
#: MAX_PATTERNS patterns of PATTERN_SIZE bytes (the include ones first).
_FILTER_SEQ, _N_INCLUDE, _N_EXCLUDE, _PATTERNS = (1168, "<I"), (1172, "<I"), (1176, "<I"), 1184
MAX_PATTERNS, PATTERN_SIZE = 48, 32
#: The call filter (written under the same sequence number): on/off, then a bitmap of the call numbers
#: 0 to CALL_NUMBERS - 1 to keep (a larger number is kept by the plugin and filtered by the collector).
_CALL_FILTER, _CALL_KEEP, CALL_NUMBERS = (2720, "<I"), 2728, 512
#: offsetof(task_struct, real_parent): the plugin reads the caller's parent at the call (0: it does not).
_PARENT_OFFSET = (2792, "<Q")
#: Ring header fields (offset in the ring header).
_HEAD, _TAIL, _DROPPED, _SEEN, _CAPPED, _FILTERED = 0, 8, 16, 24, 32, 40
#: The plugin's record flag: the task could not be read at the call.
FLAG_TASK_UNREAD = 1
#: The plugin's record flag: pid, tgid and comm were read at the call.
FLAG_IDENTITY = 2
#: Record flags: the path / argv were read at the call (the ``path`` / ``argv`` fields).
FLAG_PATH, FLAG_ARGV = 4, 8
#: The plugin's record flag: the parent's tgid was read at the call (the ``ppid`` field).
FLAG_PPID = 16


@dataclass(frozen=True)
class PluginInstall:
    """The built plugin and the QEMU it runs in."""

    library: Path
    qemu: Path
    version: str  # "10.0.2"

    @property
    def data_dirs(self) -> list[Path]:
        """QEMU's ``-L`` directories: the private prefix's data, then the system's (firmware such as SeaBIOS)."""
        own = self.qemu.parent.parent / "share" / "qemu"
        return [d for d in (own, Path("/usr/share/qemu"), Path("/usr/share/seabios")) if d.is_dir()]


def find_plugin() -> PluginInstall:
    """The plugin built by ``scripts/qemu-plugin-setup.sh``, or a :class:`MissingDependencyError` saying so."""
    where = cache_dir() / "plugin"
    library, named = where / "vims_syscall.so", where / "qemu-binary"
    if not library.is_file() or not named.is_file():
        raise MissingDependencyError(f"the VIMS QEMU plugin is not built ({library}): run "
                                     "`bash scripts/qemu-plugin-setup.sh` (part of `make setup`)")
    qemu = Path(named.read_text().strip())
    if not os.access(qemu, os.X_OK):
        raise MissingDependencyError(f"the plugin's QEMU {qemu} is gone: run `bash scripts/qemu-plugin-setup.sh`")
    out = subprocess.run([str(qemu), "--version"], capture_output=True, text=True, check=False).stdout
    version = out.split("version", 1)[1].split()[0] if "version" in out else "unknown"
    return PluginInstall(library, qemu, version)


def plugin_filters(include: tuple[str, ...] | list[str], exclude: tuple[str, ...] | list[str]) -> bool:
    """Whether the plugin can apply these program patterns exactly as the collector's
    :meth:`~vims.tracing_policy.Policy.wants` does: at most :data:`MAX_PATTERNS`, each printable ASCII
    of fewer than :data:`PATTERN_SIZE` bytes made of plain characters, ``*`` and ``?`` (C's ``fnmatch``
    and Python's differ on brackets and backslashes, so those stay with the collector).

    >>> plugin_filters(["httpd", "kworker/*", "s?"], []), plugin_filters([], ["[ab]*"]), plugin_filters(["x" * 40], [])
    (True, False, False)
    """
    patterns = [*include, *exclude]
    return len(patterns) <= MAX_PATTERNS and all(
        0 < len(p) < PATTERN_SIZE and p.isascii() and p.isprintable() and not set(p) & {"[", "]", "\\"}
        for p in patterns)


class Rings:
    """The plugin's shared memory, mapped read-write (the collector writes the control area and ``tail``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise VimsError(f"the plugin's shared memory {self.path}: {exc.strerror} (was the guest started "
                            "with the plugin?)") from None
        try:
            self._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        magic, version, self.vcpus, self.slots, size = struct.unpack_from("<QIIII", self._map, 0)
        if magic != MAGIC or version != VERSION or size != RECORD_DTYPE.itemsize:
            self._map.close()
            raise VimsError(f"{self.path} is not a vims_syscall ring of version {VERSION}")
        self._ring_bytes = RING_HEADER + self.slots * RECORD_DTYPE.itemsize
        self._records = [np.frombuffer(self._map, RECORD_DTYPE, self.slots, self._ring(v) + RING_HEADER)
                         for v in range(self.vcpus)]

    def _ring(self, vcpu: int) -> int:
        return HEADER_SIZE + vcpu * self._ring_bytes

    def _get(self, field: tuple[int, str]) -> int:
        return int(struct.unpack_from(field[1], self._map, field[0])[0])

    def _put(self, field: tuple[int, str], value: int) -> None:
        struct.pack_into(field[1], self._map, field[0], value)

    @property
    def registers_ok(self) -> bool:
        """Whether the plugin found every register it reads (set once vCPU 0 started)."""
        return bool(self._get(_REGS_OK))

    @property
    def missing_registers(self) -> str:
        """The registers the plugin did not find, comma separated."""
        return bytes(self._map[_MISSING:_MISSING + 64]).split(b"\0", 1)[0].decode()

    def control(self, *, enabled: bool | None = None, task_offset: int | None = None,
                cap_per_s: int | None = None, task_fields: tuple[int, int, int, int] | None = None,
                strings: tuple[dict[int, int], dict[int, int]] | None = None,
                programs: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
                calls: frozenset[int] | set[int] | None = None, call_filter: bool | None = None) -> None:
        """Write the control area (read by the plugin at every call: it takes effect at once).

        ``task_fields``: the offsets of ``pid``, ``tgid``, ``comm`` and ``real_parent`` in ``task_struct``.
        ``strings``: per call number, the argument (0-5) holding a path, and the one holding ``argv``:
        the plugin copies them at the call.
        ``programs``: the include and exclude patterns the plugin filters callers by; give only
        patterns :func:`plugin_filters` accepts (empty lists: no filter in the plugin).
        ``calls`` and ``call_filter``: the call numbers (below :data:`CALL_NUMBERS`) the plugin keeps,
        and whether it filters by call at all (``call_filter=False``: every call).
        """
        if calls is not None and not all(0 <= nr < CALL_NUMBERS for nr in calls):
            raise VimsError(f"the plugin filters call numbers 0-{CALL_NUMBERS - 1} only")
        if programs is not None and not plugin_filters(*programs):
            raise VimsError("the plugin cannot apply these program patterns: filter them in the collector")
        filters = programs is not None or calls is not None or call_filter is not None
        seq = self._get(_FILTER_SEQ)
        if filters:
            self._put(_FILTER_SEQ, seq | 1)  # odd: the plugin keeps every call while the filters change
        if calls is not None:
            bits = np.zeros(CALL_NUMBERS, dtype=bool)
            bits[list(calls)] = True
            self._map[_CALL_KEEP:_CALL_KEEP + CALL_NUMBERS // 8] = np.packbits(bits, bitorder="little").tobytes()
        if call_filter is not None:
            self._put(_CALL_FILTER, int(call_filter))
        if programs is not None:
            include, exclude = programs
            for i, pattern in enumerate((*include, *exclude)):
                at = _PATTERNS + i * PATTERN_SIZE
                self._map[at:at + PATTERN_SIZE] = pattern.encode("ascii").ljust(PATTERN_SIZE, b"\0")
            self._put(_N_INCLUDE, len(include))
            self._put(_N_EXCLUDE, len(exclude))
        if filters:
            self._put(_FILTER_SEQ, (seq | 1) + 1)
        if strings is not None:
            for where, table in zip((_PATH_ARG, _ARGV_ARG), strings, strict=True):
                row = bytearray(512)
                for nr, arg in table.items():
                    if 0 <= nr < 512 and 0 <= arg < 6:
                        row[nr] = arg + 1
                self._map[where:where + 512] = bytes(row)
        if task_fields is not None:
            self._put(_TGID_OFFSET, task_fields[1])
            self._put(_COMM_OFFSET, task_fields[2])
            self._put(_PARENT_OFFSET, task_fields[3])
            self._put(_PID_OFFSET, task_fields[0])
        if task_offset is not None:
            self._put(_TASK_OFFSET, task_offset)
        if cap_per_s is not None:
            self._put(_CAP, cap_per_s)
        if enabled is not None:
            self._put(_ENABLED, int(enabled))
        self._put(_GENERATION, self._get(_GENERATION) + 1)

    @property
    def enabled(self) -> bool:
        """Whether the plugin records."""
        return bool(self._get(_ENABLED))

    def counter(self, vcpu: int, name: str) -> int:
        """A ring counter of ``vcpu``: head, tail, dropped, seen, capped or filtered."""
        off = {"head": _HEAD, "tail": _TAIL, "dropped": _DROPPED, "seen": _SEEN, "capped": _CAPPED,
               "filtered": _FILTERED}[name]
        return int(struct.unpack_from("<Q", self._map, self._ring(vcpu) + off)[0])

    def take(self, vcpu: int, limit: int | None = None) -> np.ndarray:
        """The records of ``vcpu`` written since the last take (a copy), and frees their slots."""
        base = self._ring(vcpu)
        head = self.counter(vcpu, "head")
        tail = self.counter(vcpu, "tail")
        n = head - tail
        if limit is not None:
            n = min(n, limit)
        if n <= 0:
            return np.empty(0, RECORD_DTYPE)
        start = tail % self.slots
        ring = self._records[vcpu]
        end = start + n
        out = ring[start:end].copy() if end <= self.slots else np.concatenate((ring[start:], ring[:end - self.slots]))
        struct.pack_into("<Q", self._map, base + _TAIL, tail + n)
        return out

    def close(self) -> None:
        """Unmap (the file stays: QEMU owns it)."""
        self._records = []
        with contextlib.suppress(BufferError):  # a view of it still alive: the mapping goes with it
            self._map.close()
