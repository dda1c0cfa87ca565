"""The kernel a running VM booted, found from what it has: the release in its RAM, the image on its disk.

A VM that its bootloader started (no ``-kernel`` on QEMU's command line) has its kernel image only on
its own disk, as ``/boot/vmlinuz-RELEASE``. The release is read from the running kernel's
``linux_banner`` in guest RAM (``Linux version RELEASE (...``); the disk is the one QEMU's monitor
names (``query-block``), a raw image with one file system or a partition table (MBR or GPT) whose
partitions are searched for ``/boot/vmlinuz-RELEASE`` (a root file system) or ``/vmlinuz-RELEASE`` (a
separate ``/boot``). Disks in other formats (qcow2 and others) are not read here: the error says so
and how to give the image instead.

>>> mbr = bytearray(512); mbr[510:512] = b"\\x55\\xaa"
>>> mbr[446 + 4] = 0x83; mbr[446 + 8:446 + 16] = (2048).to_bytes(4, "little") + (4096).to_bytes(4, "little")
>>> partitions(bytes(mbr), 1 << 30)
[(1048576, 2097152)]
>>> releases_in(b"..Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org) ...Linux version 6.1.0-57-amd64 (x")
['6.1.0-57-amd64']
"""

from __future__ import annotations

import re
import stat
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from vims.errors import InputError, VimsError

__all__ = ["find_kernel_image", "partitions", "release_in_memory", "releases_in"]

SECTOR = 512
_BANNER = re.compile(rb"Linux version (\d+\.\d+[\w.+~-]*) \(")
#: Where the running kernel's banner is looked for: the kernel image lies in the first GiBs of RAM.
_SCAN = 4 << 30
_CHUNK = 16 << 20


def releases_in(data: bytes) -> list[str]:
    """The kernel releases named by ``Linux version`` banners in ``data``, most frequent first."""
    counts = Counter(m.group(1).decode("ascii", "replace") for m in _BANNER.finditer(data))
    return [release for release, _ in counts.most_common()]


def release_in_memory(memory: Any) -> list[str]:
    """The releases that kernel banners in guest RAM name, most frequent first (the running kernel's
    banner is in its image and in the log buffer; a reboot in place can leave an older one)."""
    found: Counter[str] = Counter()
    for region in memory.regions:
        end = min(region.paddr + region.size, _SCAN)
        at = region.paddr
        while at < end:
            size = min(_CHUNK + 256, end - at)
            found.update(releases_in(memory.read(at, size)))
            at += _CHUNK
    return [release for release, _ in found.most_common()]


def partitions(head: bytes, disk_size: int) -> list[tuple[int, int]]:
    """``(offset, size)`` in bytes of each partition that the table in ``head`` (the disk's first
    sectors, at least 34 for GPT) lists; the whole disk when it has no table."""
    if len(head) >= SECTOR and head[510:512] == b"\x55\xaa":
        entries = [struct.unpack_from("<B3xII", head, 446 + 16 * i + 4) for i in range(4)]
        if any(kind == 0xEE for kind, _, _ in entries) and head[SECTOR:SECTOR + 8] == b"EFI PART":
            table_lba, count, size = struct.unpack_from("<QII", head, SECTOR + 72)
            found = []
            for i in range(min(count, 128)):
                at = table_lba * SECTOR + i * size
                if at + 48 > len(head):
                    break
                first, last = struct.unpack_from("<QQ", head, at + 32)
                if head[at:at + 16] != bytes(16) and last >= first:
                    found.append((first * SECTOR, (last - first + 1) * SECTOR))
            return found
        listed = [(start * SECTOR, count * SECTOR) for kind, start, count in entries if kind and count]
        if listed:
            return listed
    return [(0, disk_size)]


def _disks(monitor: Any) -> list[tuple[str, str]]:
    """``(file, format)`` of each disk the monitor names, the first one first."""
    disks = []
    for dev in monitor.execute("query-block") or []:
        inserted = dev.get("inserted") or {}
        image = inserted.get("image") or {}
        path = image.get("filename") or inserted.get("file")
        if path and not dev.get("removable"):
            disks.append((str(path), str(image.get("format") or inserted.get("drv") or "")))
    return disks


def find_kernel_image(monitor: Any, memory: Any, into: Path) -> tuple[Path, str]:
    """The image of the kernel the VM runs, copied out of its disk to ``into`` (a folder), and its
    release; :class:`InputError` says what was missing and how to give the image instead."""
    from vims.collector.ext4 import Ext4Image

    releases = release_in_memory(memory)
    if not releases:
        raise VimsError("no kernel banner in the VM's RAM (not booted yet, or not Linux): give its kernel "
                        "image with --kernel")
    tried = []
    for path, fmt in _disks(monitor):
        if fmt != "raw":
            tried.append(f"{path} ({fmt or 'unknown format'}: only raw disks are read)")
            continue
        try:
            with open(path, "rb") as disk:
                head = disk.read(34 * SECTOR)
                size = disk.seek(0, 2)
        except OSError as exc:
            tried.append(f"{path} ({exc.strerror})")
            continue
        for offset, _size in partitions(head, size):
            try:
                fs = Ext4Image(path, offset=offset)
            except InputError:
                continue
            with fs:
                for release in releases:
                    for name in (f"/boot/vmlinuz-{release}", f"/vmlinuz-{release}"):
                        number = fs.lookup(name)
                        if number is not None and stat.S_ISREG(fs.mode(number)):
                            into.mkdir(parents=True, exist_ok=True)
                            out = into / f"vmlinuz-{release}"
                            tmp = out.with_suffix(".tmp")
                            tmp.write_bytes(fs.read_inode(number))
                            tmp.replace(out)
                            return out, release
        tried.append(f"{path} (no /boot/vmlinuz-{releases[0]} on it)")
    raise InputError(f"the VM runs kernel {releases[0]}, whose image was not found on its disks: "
                     f"{'; '.join(tried) or 'the monitor names none'}. Copy /boot/vmlinuz-{releases[0]} out of "
                     "the VM and give it with --kernel")
