"""A guest's reference files: the root file system it was built from, and what its distribution says of it.

The ``process-binaries`` check compares running programs with the files they were loaded from. The
reference is a clean copy of the guest's root file system, given either as a directory (the busybox
guest's unpacked tree) or as an ext2/3/4 disk image read without mounting (:class:`~vims.collector.ext4.
Ext4Image`; the Debian guest's ``disk.img``, or the clean image of a VM we did not build).
:meth:`ReferenceFiles.open` takes either.

Paths are resolved as the guest would: symlinks are followed inside the tree (an absolute link
restarts at the tree's root), so ``/bin/sleep`` on a merged-``/usr`` system names ``/usr/bin/sleep``,
the path the kernel reports for the running program.

When the tree holds a dpkg database, :meth:`ReferenceFiles.packaged` gives the MD5 digest of every
file that a package installed (``/var/lib/dpkg/info/*.md5sums``, Debian's own reference), keyed by
the file's resolved path: a reference file can then be checked against what Debian shipped before
the guest's memory is compared with it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from vims.errors import InputError

__all__ = ["DPKG_INFO", "Packaged", "ReferenceFiles", "md5sums_entries"]

#: Where dpkg keeps each package's file list and digests.
DPKG_INFO = "/var/lib/dpkg/info"
#: Most symlinks one path may pass through (as the kernel's ``MAXSYMLINKS``).
MAX_LINKS = 40


@dataclass(frozen=True)
class Packaged:
    """A file a package installed: the package's name (``coreutils``, ``libc6:amd64``) and the file's MD5."""

    package: str
    md5: str


def md5sums_entries(text: str) -> list[tuple[str, str]]:
    """``(md5, path)`` of each line of a dpkg ``.md5sums`` file (paths made absolute).

    >>> md5sums_entries("d41d8cd98f00b204e9800998ecf8427e  usr/bin/true\\n\\nbad line\\n")
    [('d41d8cd98f00b204e9800998ecf8427e', '/usr/bin/true')]
    """
    out = []
    for line in text.splitlines():
        digest, _, path = line.partition("  ")
        if len(digest) == 32 and path:
            out.append((digest.lower(), "/" + path.lstrip("/")))
    return out


class ReferenceFiles(ABC):
    """A read-only root file-system tree: a directory or an ext2/3/4 image (:meth:`open`)."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self._packaged: dict[str, Packaged] | None = None
        self._dirs: dict[str, str | None] = {}

    @staticmethod
    def open(where: str | Path) -> ReferenceFiles:
        """The tree at ``where``: a directory, or a file holding an ext2/3/4 file system.

        Raises
        ------
        InputError
            ``where`` does not exist or is neither.
        """
        path = Path(where)
        if path.is_dir():
            return DirectoryFiles(path)
        if path.is_file():
            return ImageFiles(path)
        raise InputError("no reference root file system here (a directory or an ext4 image)", where=str(path))

    def __enter__(self) -> ReferenceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def close(self) -> None:
        """Release the tree (an image's mapping)."""

    @abstractmethod
    def kind(self, path: str) -> str | None:
        """``dir``, ``file``, ``link``, ``other`` or None (absent) for ``path``, its last part not followed."""

    @abstractmethod
    def readlink(self, path: str) -> str:
        """The target of the symlink ``path``."""

    @abstractmethod
    def listdir(self, path: str) -> list[str]:
        """The names in the directory ``path`` (resolved)."""

    @abstractmethod
    def _read(self, path: str) -> bytes:
        """The contents of the regular file at the resolved ``path``."""

    def resolve(self, path: str) -> str | None:
        """``path`` with every symlink followed inside the tree, or None if it leads nowhere.

        The last part is followed too; the result need not be a regular file.
        """
        done: list[str] = []
        parts = [p for p in path.split("/") if p]
        links = 0
        while parts:
            part = parts.pop(0)
            if part == ".":
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            here = "/" + "/".join([*done, part])
            kind = self.kind(here)
            if kind is None:
                return None
            if kind == "link":
                links += 1
                if links > MAX_LINKS:
                    return None
                target = self.readlink(here)
                if target.startswith("/"):
                    done = []
                parts = [p for p in target.split("/") if p] + parts
                continue
            if parts and kind != "dir":
                return None
            done.append(part)
        return "/" + "/".join(done)

    def read_file(self, path: str) -> tuple[str, bytes] | None:
        """The resolved path and contents of the regular file ``path``, or None if there is none."""
        resolved = self.resolve(path)
        if resolved is None or self.kind(resolved) != "file":
            return None
        return resolved, self._read(resolved)

    def _resolved_dir(self, directory: str) -> str | None:
        if directory not in self._dirs:
            self._dirs[directory] = self.resolve(directory)
        return self._dirs[directory]

    def packaged(self) -> dict[str, Packaged]:
        """Every file a dpkg package installed, by resolved path (empty when the tree has no dpkg database).

        Read once from ``/var/lib/dpkg/info/*.md5sums``; a file two packages list keeps the first
        package's entry (by name).
        """
        if self._packaged is not None:
            return self._packaged
        out: dict[str, Packaged] = {}
        info = self.resolve(DPKG_INFO)
        names = sorted(self.listdir(info)) if info is not None and self.kind(info) == "dir" else []
        for name in names:
            if not name.endswith(".md5sums"):
                continue
            found = self.read_file(f"{info}/{name}")
            if found is None:
                continue
            package = name[: -len(".md5sums")]
            for digest, path in md5sums_entries(found[1].decode("utf-8", "surrogateescape")):
                directory, _, base = path.rpartition("/")
                parent = self._resolved_dir(directory or "/")
                if parent is not None:
                    out.setdefault(parent.rstrip("/") + "/" + base, Packaged(package, digest))
        self._packaged = out
        return out

    def verify(self, path: str, data: bytes) -> tuple[Packaged | None, bool]:
        """The package that installed the resolved ``path``, and whether ``data`` has its MD5.

        ``(None, False)`` when no package lists the file.
        """
        entry = self.packaged().get(path)
        if entry is None:
            return None, False
        return entry, hashlib.md5(data, usedforsecurity=False).hexdigest() == entry.md5


class DirectoryFiles(ReferenceFiles):
    """A tree that is a directory of the host."""

    def close(self) -> None:
        """Nothing to release."""

    def _host(self, path: str) -> Path:
        return self.where / path.lstrip("/")

    def kind(self, path: str) -> str | None:
        try:
            mode = os.lstat(self._host(path)).st_mode
        except OSError:
            return None
        return _kind(mode)

    def readlink(self, path: str) -> str:
        return os.readlink(self._host(path))

    def listdir(self, path: str) -> list[str]:
        return os.listdir(self._host(path))

    def _read(self, path: str) -> bytes:
        return self._host(path).read_bytes()


class ImageFiles(ReferenceFiles):
    """A tree that is an ext2/3/4 file-system image, read without mounting."""

    def __init__(self, where: Path) -> None:
        from vims.collector.ext4 import Ext4Image

        super().__init__(where)
        self.image = Ext4Image(where)

    def close(self) -> None:
        self.image.close()

    def _inode(self, path: str) -> int:
        number = self.image.lookup(path)
        if number is None:
            raise InputError(f"{path} is not in the image", where=str(self.where))
        return number

    def kind(self, path: str) -> str | None:
        number = self.image.lookup(path)
        return None if number is None else _kind(self.image.mode(number))

    def readlink(self, path: str) -> str:
        return self.image.read_inode(self._inode(path)).decode("utf-8", "surrogateescape")

    def listdir(self, path: str) -> list[str]:
        return list(self.image.entries(self._inode(path)))

    def _read(self, path: str) -> bytes:
        return self.image.read_inode(self._inode(path))


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"
