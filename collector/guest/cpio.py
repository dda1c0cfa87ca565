"""A ``newc`` cpio writer: the initramfs format the Linux kernel unpacks at boot.

Written here rather than by calling ``cpio`` so that device nodes and ownership need no privileges
and the archive is byte-for-byte reproducible (fixed inode numbers and times).

>>> entries = [Entry("init", 0o100755, b"#!/bin/sh\\n"), Entry("dev", 0o040755)]
>>> data = newc(entries)
>>> data[:6], data.count(b"TRAILER!!!"), len(data) % 512
(b'070701', 1, 0)
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Entry", "newc"]


@dataclass
class Entry:
    """One archive member: ``path`` without a leading slash, full ``mode`` (type and permissions).

    ``data`` is the file's content or a symlink's target; ``rdev`` is ``(major, minor)`` of a device.
    """

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, e: Entry, size: int, name: bytes) -> bytes:
    fields = (
        ino, e.mode, e.uid, e.gid, 1, 0, size, 0, 0, e.rdev[0], e.rdev[1], len(name) + 1, 0,
    )  # fmt: skip
    return b"070701" + b"".join(f"{v:08x}".encode() for v in fields)


def newc(entries: Iterable[Entry]) -> bytes:
    """The ``newc`` archive of ``entries`` (in the given order), padded to 512 bytes."""
    out = bytearray()
    for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], 1):
        name = e.path.lstrip("/").encode()
        data = e.data if stat.S_ISREG(e.mode) or stat.S_ISLNK(e.mode) else b""
        head = _header(ino if e.path != "TRAILER!!!" else 0, e, len(data), name)
        out += head + name + b"\0"
        out += _pad(len(head) + len(name) + 1)
        out += data + _pad(len(data))
    out += b"\0" * (-len(out) % 512)
    return bytes(out)
