"""Read files out of an ext2/3/4 file-system image without mounting it (read-only, pure Python).

The A-VM takes its reference files (the executables a guest should run, and the package database
that vouches for them) from the guest's own disk image, a raw ``ext4`` file such as ``mke2fs -d``
writes. Mounting needs root and a loop device; ``debugfs`` (e2fsprogs) starts once per file. This
reader maps the image and follows the on-disk layout: the superblock, the group descriptors
(32 or 64 bytes, ``64bit``), inodes, extent trees (any depth; unwritten extents read as zeros) or the
older block maps (direct, indirect, double and triple indirect blocks), linear directory entries
(``dir_index`` trees keep them readable that way) and fast symlinks. Inline data (``inline_data``,
not a default feature) is read from the inode's block area only.

Paths are looked up from the image's root and never follow a symlink themselves:
:func:`vims.collector.reference_files` resolves links within the tree.
"""

from __future__ import annotations

import itertools
import mmap
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from vims.errors import InputError

__all__ = ["Ext4Image"]

EXT4_MAGIC = 0xEF53
EXTENT_MAGIC = 0xF30A
INCOMPAT_64BIT = 0x80
EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
ROOT_INODE = 2
#: Longest chain of indirections a path lookup or a tree walk accepts (a corrupt image must end).
MAX_DEPTH = 8
_UNWRITTEN = 32768


class Ext4Image:
    """A read-only view of the file system in ``path`` (a raw image of one ext2, ext3 or ext4 file system).

    Parameters
    ----------
    path : str or Path
        The image file.
    offset : int
        Where the file system starts in it (a partition of a disk image; a multiple of the page size,
        as partitions aligned to 1 MiB are).

    Raises
    ------
    InputError
        The file is missing or does not hold an ext2/3/4 file system.

    Examples
    --------
    On a guest's disk (not a doctest)::

        with Ext4Image("disk.img") as fs:
            fs.read_file("/etc/hostname")
    """

    def __init__(self, path: str | Path, offset: int = 0) -> None:
        self.path = Path(path)
        if offset % mmap.ALLOCATIONGRANULARITY:
            raise InputError(f"a file system at byte {offset} is not page-aligned: not read", where=str(self.path))
        try:
            with self.path.open("rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ, offset=offset)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the file-system image: {exc}", where=str(self.path)) from exc
        sb = self._map[1024:2048]
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != EXT4_MAGIC:
            self._map.close()
            raise InputError("not an ext2/3/4 file-system image (no superblock magic)", where=str(self.path))
        self.block_size = 1024 << struct.unpack_from("<I", sb, 24)[0]
        self.inodes_per_group = struct.unpack_from("<I", sb, 40)[0]
        first_data_block = struct.unpack_from("<I", sb, 20)[0]
        rev_level = struct.unpack_from("<I", sb, 76)[0]
        self.inode_size = struct.unpack_from("<H", sb, 88)[0] if rev_level else 128
        incompat = struct.unpack_from("<I", sb, 96)[0]
        self._wide = bool(incompat & INCOMPAT_64BIT)
        self.desc_size = max(32, struct.unpack_from("<H", sb, 254)[0]) if self._wide else 32
        self._gdt = (first_data_block + 1) * self.block_size
        self._dirs: dict[int, dict[str, int]] = {}

    def __enter__(self) -> Ext4Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the image."""
        self._map.close()

    # -- inodes ------------------------------------------------------------------------------------
    def _inode(self, number: int) -> bytes:
        group, index = divmod(number - 1, self.inodes_per_group)
        desc = self._gdt + group * self.desc_size
        table = struct.unpack_from("<I", self._map, desc + 8)[0]
        if self._wide and self.desc_size >= 64:
            table |= struct.unpack_from("<I", self._map, desc + 0x28)[0] << 32
        at = table * self.block_size + index * self.inode_size
        raw = self._map[at:at + self.inode_size]
        if len(raw) < 128:
            raise InputError(f"inode {number} lies beyond the end of the image", where=str(self.path))
        return raw

    @staticmethod
    def _size(inode: bytes) -> int:
        lo, hi = struct.unpack_from("<I", inode, 4)[0], struct.unpack_from("<I", inode, 108)[0]
        return lo | hi << 32

    def mode(self, number: int) -> int:
        """``i_mode`` of inode ``number`` (type and permission bits, as :mod:`stat` reads them)."""
        return int(struct.unpack_from("<H", self._inode(number), 0)[0])

    def _block(self, number: int) -> bytes:
        return self._map[number * self.block_size:(number + 1) * self.block_size]

    def _extents(self, node: bytes, depth_left: int) -> Iterator[tuple[int, int, int, bool]]:
        """``(logical block, physical block, length, unwritten)`` of the extent tree in ``node``."""
        magic, entries, _, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != EXTENT_MAGIC or depth_left < 0:
            raise InputError("a corrupt extent tree", where=str(self.path))
        for i in range(entries):
            at = 12 + 12 * i
            if depth == 0:
                logical, length, hi, lo = struct.unpack_from("<IHHI", node, at)
                unwritten = length > _UNWRITTEN
                yield logical, lo | hi << 32, length - _UNWRITTEN if unwritten else length, unwritten
            else:
                _, lo, hi = struct.unpack_from("<IIH", node, at)
                yield from self._extents(self._block(lo | hi << 32), depth_left - 1)

    def _mapped_blocks(self, table: bytes, level: int) -> Iterator[int]:
        """The data blocks an indirect block (``level`` 1-3) or the inode's 15 pointers (0) list."""
        pointers = struct.unpack(f"<{len(table) // 4}I", table)
        if level == 0:
            yield from pointers[:12]
            for depth, pointer in enumerate(pointers[12:15], start=1):
                yield from self._indirect(pointer, depth)
        else:
            yield from pointers

    def _indirect(self, pointer: int, depth: int) -> Iterator[int]:
        per_block = self.block_size // 4
        if not pointer:  # a hole: as many zero blocks as the pointer would have covered
            yield from itertools.repeat(0, per_block ** depth)
            return
        for block in self._mapped_blocks(self._block(pointer), depth):
            yield from [block] if depth == 1 else self._indirect(block, depth - 1)

    def read_inode(self, number: int) -> bytes:
        """The contents of inode ``number`` (holes and unwritten extents as zeros)."""
        inode = self._inode(number)
        size = self._size(inode)
        flags = struct.unpack_from("<I", inode, 32)[0]
        area = inode[40:100]
        mode = struct.unpack_from("<H", inode, 0)[0]
        if flags & INLINE_DATA_FL or (stat.S_ISLNK(mode) and size < 60 and not flags & EXTENTS_FL):
            return area[:size]
        out = bytearray(size)
        bs = self.block_size
        if flags & EXTENTS_FL:
            for logical, physical, length, unwritten in self._extents(area, MAX_DEPTH):
                start = logical * bs
                if unwritten or start >= size:
                    continue
                chunk = self._map[physical * bs:physical * bs + min(length * bs, size - start)]
                out[start:start + len(chunk)] = chunk
        else:
            blocks = (size + bs - 1) // bs
            for index, block in zip(range(blocks), self._mapped_blocks(area, 0), strict=False):
                if block:
                    chunk = self._block(block)[:size - index * bs]
                    out[index * bs:index * bs + len(chunk)] = chunk
        return bytes(out)

    # -- directories and paths ---------------------------------------------------------------------
    def entries(self, number: int) -> dict[str, int]:
        """``{name: inode}`` of the directory at inode ``number`` (without ``.`` and ``..``)."""
        known = self._dirs.get(number)
        if known is not None:
            return known
        data = self.read_inode(number)
        names: dict[str, int] = {}
        at = 0
        while at + 8 <= len(data):
            inode, rec_len, name_len = struct.unpack_from("<IHB", data, at)
            if rec_len < 8:
                break
            if inode:
                name = data[at + 8:at + 8 + name_len].decode("utf-8", "surrogateescape")
                if name not in (".", ".."):
                    names[name] = inode
            at += rec_len
        self._dirs[number] = names
        return names

    def lookup(self, path: str) -> int | None:
        """The inode of ``path`` (absolute, no symlink followed on the way), or None if absent."""
        number = ROOT_INODE
        for part in (p for p in path.split("/") if p):
            if not stat.S_ISDIR(self.mode(number)):
                return None
            found = self.entries(number).get(part)
            if found is None:
                return None
            number = found
        return number
