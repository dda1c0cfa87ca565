"""Reference files from a directory and from ext2/ext4 images written by ``mke2fs -d`` (no mount): the
same tree read three ways gives the same files, symlinks resolved inside it, and the dpkg md5sums."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.required import missing
from vims.collector.ext4 import Ext4Image
from vims.collector.reference_files import ReferenceFiles
from vims.errors import InputError

#: Sizes that need an extent tree / double-indirect blocks on a 1 KiB-block ext2, and a hole.
BIG = 700_000


def _tree(root: Path) -> dict[str, bytes]:
    """A small merged-/usr system with a dpkg database; returns its regular files' contents."""
    rng = random.Random(7)
    files = {
        "usr/bin/tool": b"\x7fELF tool" + bytes(5000),
        "usr/lib/libbig.so": rng.randbytes(BIG),
        "usr/local/bin/own": b"not packaged",
        "etc/hostname": b"vims\n",
    }
    files.update({f"usr/share/many/f{i:04d}": str(i).encode() for i in range(600)})  # a multi-block directory
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    with (root / "usr/lib/sparse").open("wb") as handle:
        handle.seek(3 << 20)
        handle.write(b"end")
    files["usr/lib/sparse"] = bytes(3 << 20) + b"end"
    os.symlink("usr/bin", root / "bin")
    os.symlink("usr/lib", root / "lib")
    os.symlink("/usr/bin/tool", root / "usr/bin/absolute")
    long_dir = root / ("usr/lib/" + "d" * 70)
    long_dir.mkdir()
    os.symlink("d" * 70 + "/../../../bin/tool", root / "usr/lib/slow")  # a link longer than 60 bytes
    os.symlink("loop2", root / "usr/bin/loop1")
    os.symlink("loop1", root / "usr/bin/loop2")
    info = root / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    tool = hashlib.md5(files["usr/bin/tool"]).hexdigest()
    (info / "tool.md5sums").write_text(f"{tool}  bin/tool\n{'0' * 32}  usr/lib/libbig.so\n")
    (info / "libbig:amd64.list").write_text("/usr/lib/libbig.so\n")
    return files


@pytest.fixture(scope="module", params=["directory", "ext4", "ext2-1k"])
def tree(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    base = tmp_path_factory.mktemp(request.param)
    root = base / "root"
    root.mkdir()
    files = _tree(root)
    if request.param == "directory":
        return root, files
    if shutil.which("mke2fs") is None:
        missing("mke2fs not found (scripts/system-packages.sh installs e2fsprogs)")
    image = base / "disk.img"
    kind = ["-t", "ext4"] if request.param == "ext4" else ["-t", "ext2", "-b", "1024"]
    subprocess.run(["mke2fs", "-q", "-F", *kind, "-d", str(root), str(image), "16M"], check=True,
                   capture_output=True)
    return image, files


def test_every_file_reads_as_written(tree: tuple[Path, dict[str, bytes]]) -> None:
    where, files = tree
    with ReferenceFiles.open(where) as ref:
        for path, data in files.items():
            assert ref.read_file("/" + path) == ("/" + path, data), path


def test_symlinks_resolve_inside_the_tree(tree: tuple[Path, dict[str, bytes]]) -> None:
    where, files = tree
    with ReferenceFiles.open(where) as ref:
        assert ref.resolve("/bin/tool") == "/usr/bin/tool"
        assert ref.resolve("/usr/bin/absolute") == "/usr/bin/tool"
        assert ref.resolve("/usr/lib/slow") == "/usr/bin/tool"
        # ".." after a link leaves the link's target, as the kernel does: /lib/.. is /usr
        assert ref.resolve("/lib/../bin/tool") == "/usr/bin/tool"
        assert ref.resolve("/lib/../etc/hostname") is None
        assert ref.read_file("/bin/absolute") == ("/usr/bin/tool", files["usr/bin/tool"])
        assert ref.resolve("/usr/bin/loop1") is None  # a loop of links leads nowhere
        assert ref.resolve("/etc/hostname/x") is None and ref.read_file("/nope") is None
        assert ref.read_file("/usr/bin") is None  # a directory is not a file
        assert len(ref.listdir("/usr/share/many")) == 600


def test_dpkg_md5sums_are_keyed_by_resolved_path(tree: tuple[Path, dict[str, bytes]]) -> None:
    where, files = tree
    with ReferenceFiles.open(where) as ref:
        packaged = ref.packaged()
        assert set(packaged) == {"/usr/bin/tool", "/usr/lib/libbig.so"}  # bin/tool listed through /bin
        assert packaged["/usr/bin/tool"].package == "tool"
        entry, ok = ref.verify("/usr/bin/tool", files["usr/bin/tool"])
        assert entry is not None and ok
        assert ref.verify("/usr/lib/libbig.so", files["usr/lib/libbig.so"])[1] is False  # not what was shipped
        assert ref.verify("/usr/local/bin/own", files["usr/local/bin/own"]) == (None, False)


def test_a_tree_without_dpkg_has_no_packages(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    with ReferenceFiles.open(tmp_path) as ref:
        assert ref.packaged() == {}


def test_what_is_not_a_file_system_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(4096))
    with pytest.raises(InputError, match="not an ext2/3/4 file-system image"):
        ReferenceFiles.open(junk)
    with pytest.raises(InputError, match="no reference root file system here"):
        ReferenceFiles.open(tmp_path / "missing")
    with pytest.raises(InputError, match="cannot read the file-system image"):
        Ext4Image(tmp_path / "missing.img")
