"""Build the C-VM guest image from Debian packages, and its kernel profile and kernel-text reference.

``build_guest()``:

1. resolves the kernel that ``linux-image-amd64`` depends on *now* (``apt-cache``), and
   ``busybox-static``; fetches both with ``apt-get download`` and unpacks them with ``dpkg-deb -x``;
2. assembles the root file system (busybox and its applet links, the workload scripts in
   ``rootfs/``, a second copy of busybox as ``/usr/bin/busybox-ticker`` for the tamper scenario) and
   writes it as a gzipped ``newc`` initramfs;
3. reads the structure layouts from the kernel's BTF (:mod:`vims.collector.btf`);
4. boots the guest once (TCG, ``nokaslr``) to capture ``/proc/kallsyms`` through a serial port, and,
   once it has settled, copies the kernel text ``[_stext, _etext)`` out of the guest's RAM file: the
   reference for the ``kernel-text`` check (the kernel patches its own text at boot, so it must come
   from a running guest of the same kernel and CPU model).

Everything lands in ``cache_dir("guest", <release>)``, keyed on the package versions and a hash of the
files in ``rootfs/``; a rebuild with nothing changed returns the cached image.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vims.collector.guest.cpio import Entry, newc
from vims.errors import MissingDependencyError, VimsError
from vims.paths import cache_dir

__all__ = ["GuestImage", "build_guest", "find_tamper_offset", "resolve_packages"]

#: Bump when the build changes in a way the cache key would not see.
BUILD_FORMAT = 1
KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
ROOTFS_SOURCES = Path(__file__).with_name("rootfs")
TAMPER_PROGRAM = "usr/bin/busybox-ticker"
CPU_MODEL = "max"

#: Guest path -> (file in rootfs/, mode).
ROOTFS_FILES: dict[str, tuple[str, int]] = {
    "etc/inittab": ("inittab.txt", 0o644),
    "etc/init.d/rcS": ("rcS.sh", 0o755),
    "etc/passwd": ("passwd.txt", 0o644),
    "etc/shadow": ("shadow.txt", 0o600),
    "etc/group": ("group.txt", 0o644),
    "sbin/vims-agent": ("agent.sh", 0o755),
    "sbin/vims-periodic": ("periodic.sh", 0o755),
    "sbin/vims-webclient": ("webclient.sh", 0o755),
    "sbin/vims-client": ("client.sh", 0o755),
    "sbin/vims-scenario": ("scenario.sh", 0o755),
    "www/index.html": ("index.html", 0o644),
    "www/cgi-bin/status.cgi": ("status.cgi", 0o755),
    "www/cgi-bin/exec.cgi": ("exec.cgi", 0o755),
}
DIRECTORIES = (
    "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "etc/init.d", "etc/vims", "proc", "sys", "dev",
    "tmp", "var", "var/log", "var/run", "root", "home", "home/alice", "www", "www/cgi-bin", "mnt",
)  # fmt: skip
#: Kernel options the guest needs built in (no modules in the initramfs).
REQUIRED_CONFIG = (
    "CONFIG_SERIAL_8250", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_BLK_DEV_INITRD", "CONFIG_RD_GZIP",
    "CONFIG_DEVTMPFS", "CONFIG_UNIX", "CONFIG_INET", "CONFIG_BINFMT_ELF", "CONFIG_BINFMT_SCRIPT",
    "CONFIG_PROC_FS", "CONFIG_DEBUG_INFO_BTF", "CONFIG_KALLSYMS_ALL",
)  # fmt: skip


@dataclass
class GuestImage:
    """A built guest: kernel, initramfs, kernel profile, the unpacked root file system, text reference.

    Attributes
    ----------
    release : str
        The kernel release (``6.1.0-56-amd64``).
    kernel, initramfs, profile : Path
        ``vmlinuz``, the gzipped cpio and the profile JSON.
    rootfs : Path
        The unpacked root file system (reference hashes of the guest's executables come from here).
    """

    release: str
    kernel: Path
    initramfs: Path
    profile: Path
    rootfs: Path
    directory: Path = field(default_factory=Path)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu(self) -> str:
        """The QEMU CPU model the image's first boot ran on (any model serves: kernel-text's reference is
        the ``vmlinuz`` itself)."""
        return str(self.info.get("cpu", CPU_MODEL))

    @property
    def tamper(self) -> dict[str, Any]:
        """The tamper scenario's program (guest path), file offset and new byte value."""
        return dict(self.info.get("tamper", {}))

    @classmethod
    def at(cls, directory: Path) -> GuestImage:
        """The image whose files are in ``directory`` (a cache folder)."""
        info = json.loads((directory / "build.json").read_text()) if (directory / "build.json").exists() else {}
        return cls(
            release=str(info.get("release", directory.name)),
            kernel=directory / "vmlinuz",
            initramfs=directory / "initramfs.cpio.gz",
            profile=directory / "profile.json",
            rootfs=directory / "rootfs",
            directory=directory,
            info=info,
        )

    def complete(self) -> bool:
        """Whether every file of the image exists."""
        paths = (self.kernel, self.initramfs, self.profile, self.rootfs)
        return all(p.exists() for p in paths) and (self.directory / "build.json").exists()


# -- packages ------------------------------------------------------------------------------------


def _apt(args: list[str], cwd: Path | None = None) -> str:
    if shutil.which(args[0]) is None:
        raise MissingDependencyError(f"{args[0]} not found: the guest is built from Debian packages (apt)")
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise MissingDependencyError(
            f"`{' '.join(args)}` failed: {proc.stderr.strip()[-400:]} (try `apt-get update`)"
        )
    return proc.stdout


def _candidate_version(package: str) -> str:
    text = _apt(["apt-cache", "show", "--no-all-versions", package])
    for line in text.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise MissingDependencyError(f"apt knows no version of {package} (try `apt-get update`)")


def resolve_packages() -> dict[str, str]:
    """The kernel package that ``linux-image-amd64`` depends on now, and the versions to fetch.

    One ``apt-cache show`` (it costs about a second; every test session asks).
    """
    text = _apt(["apt-cache", "show", "--no-all-versions", KERNEL_META, BUSYBOX])
    fields: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" "):
            if key == "Package":
                current = fields.setdefault(value.strip(), {})
            current[key] = value.strip()
    meta, busybox = fields.get(KERNEL_META, {}), fields.get(BUSYBOX, {})
    match = re.search(r"(linux-image-[\w.+-]+)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", meta.get("Depends", ""))
    if match is None or "Version" not in busybox:
        raise MissingDependencyError(
            f"apt knows no kernel behind {KERNEL_META} or no {BUSYBOX} (try `apt-get update`)"
        )
    kernel = match.group(1)
    return {
        "kernel_package": kernel,
        "kernel_version": match.group(2) or _candidate_version(kernel),
        "busybox_version": busybox["Version"],
        "release": kernel.removeprefix("linux-image-"),
    }


def _sources_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(ROOTFS_SOURCES.iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(json.dumps(ROOTFS_FILES, sort_keys=True).encode())
    return h.hexdigest()


def _cache_key(pkgs: dict[str, str]) -> str:
    data = {"format": BUILD_FORMAT, "cpu": CPU_MODEL, "rootfs": _sources_hash(), **pkgs}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# -- root file system ----------------------------------------------------------------------------


def find_tamper_offset(program: bytes) -> tuple[int, int]:
    """A byte of ``program`` (a static x86-64 ELF) that is safe to change in a code page that runs.

    It is the last byte of the multi-byte ``nop`` padding (``66 2e 0f 1f 84 00 00 00 00 00``) that
    follows a ``ret`` or ``hlt`` in the page of the entry point: never executed, and even if it were,
    changing a displacement byte keeps it a ``nop``. Returns ``(file offset, new byte value)``.
    """
    if program[:4] != b"\x7fELF":
        raise VimsError("the tamper program is not an ELF file")
    entry = struct.unpack_from("<Q", program, 0x18)[0]
    phoff = struct.unpack_from("<Q", program, 0x20)[0]
    phnum = struct.unpack_from("<H", program, 0x38)[0]
    entry_off = None
    for i in range(phnum):
        p_type, p_flags, p_off, p_vaddr, _, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", program, phoff + 56 * i)
        if p_type == 1 and p_flags & 1 and p_vaddr <= entry < p_vaddr + p_filesz:
            entry_off = entry - p_vaddr + p_off
    if entry_off is None:
        raise VimsError("cannot place the entry point of the tamper program in its file")
    page = entry_off & ~0xFFF
    nop = bytes.fromhex("662e0f1f840000000000")
    candidates = []
    for lead in (b"\xf4", b"\xc3"):
        pos = program.find(lead + nop, page)
        while 0 <= pos < page + 0x1000 - len(nop) - 1:
            end = pos + 1 + len(nop)
            if end % 16 == 0 or program[end : end + 1] in (b"\x90", b"\x0f", b"\x66"):
                candidates.append(end - 1)
            pos = program.find(lead + nop, pos + 1)
    if not candidates:
        raise VimsError("no padding after a return in the entry page of the tamper program")
    offset = min(candidates, key=lambda c: abs(c - entry_off))
    return offset, program[offset] ^ 0x01


def _rootfs_entries(busybox: bytes, applets: list[str], tamper: tuple[int, int]) -> list[Entry]:
    entries: list[Entry] = [Entry(d, 0o040755) for d in DIRECTORIES]
    entries.append(Entry("tmp", 0o041777))
    entries += [
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        Entry("bin/busybox", 0o100755, busybox),
        Entry(TAMPER_PROGRAM, 0o100755, busybox),
        Entry("init", 0o120777, b"bin/busybox"),
    ]
    seen = {e.path for e in entries}
    for applet in applets:
        path = applet.strip().lstrip("/")
        if not path or path in seen or path == "bin/busybox":
            continue
        depth = path.count("/")
        target = "../" * depth + "bin/busybox" if depth else "bin/busybox"
        entries.append(Entry(path, 0o120777, target.encode()))
        seen.add(path)
    for guest_path, (source, mode) in ROOTFS_FILES.items():
        entries.append(Entry(guest_path, stat.S_IFREG | mode, (ROOTFS_SOURCES / source).read_bytes()))
    conf = (
        f"TAMPER_PROGRAM=/{TAMPER_PROGRAM}\nTAMPER_OFFSET={tamper[0]}\nTAMPER_VALUE={tamper[1]}\n"
    ).encode()
    entries.append(Entry("etc/vims/tamper.conf", 0o100644, conf))
    entries.append(Entry("etc/hostname", 0o100644, b"vims-guest\n"))
    # directories first, so that every parent exists when the kernel unpacks a member
    entries.sort(key=lambda e: (not stat.S_ISDIR(e.mode), e.path.count("/"), e.path))
    return entries


def _write_tree(entries: list[Entry], root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for e in entries:
        path = root / e.path
        if stat.S_ISDIR(e.mode):
            path.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(e.mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(e.data.decode())
        elif stat.S_ISREG(e.mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(e.data)
            path.chmod(stat.S_IMODE(e.mode))
        # device nodes live only in the archive


def _check_config(config: Path) -> None:
    try:
        text = config.read_text()
    except OSError:
        return  # no config shipped: the boot will tell
    have = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in text.splitlines() if "=" in line}
    missing = [opt for opt in REQUIRED_CONFIG if have.get(opt) != "y"]
    if missing:
        raise VimsError(f"the kernel lacks built-in {', '.join(missing)} (needed without modules)", where=config)


# -- the first boot ------------------------------------------------------------------------------


def _wait_for(path: Path, marker: bytes, timeout: float, alive: Callable[[], bool]) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = path.read_bytes() if path.exists() else b""
        if marker in data:
            return data[: data.index(marker)]
        if not alive():
            break
        time.sleep(0.5)
    raise VimsError(f"the guest did not write its kernel symbols within {timeout:g} s", where=path)


def _first_boot(image: GuestImage, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Boot once: capture kallsyms, then copy the settled kernel text out of the RAM file."""
    from vims.collector.gdbstub import GdbStub
    from vims.collector.guest.qemu import KERNEL_MAP_BASE, Guest
    from vims.collector.profile import parse_kallsyms

    ksyms_path = work / "kallsyms.txt"
    started = time.monotonic()
    log("booting the guest once to read its kernel symbols")
    with Guest.start(image, name=f"vims-build-{work.name[-8:]}", capture_kallsyms=ksyms_path) as guest:
        boot_seconds = time.monotonic() - started
        raw = _wait_for(ksyms_path, b"@@KALLSYMS-END", 300, lambda: guest.running)
        symbols = parse_kallsyms(raw.decode("latin-1"), where=str(ksyms_path))
        for needed in ("_stext", "_etext", "init_task", "sys_call_table"):
            if needed not in symbols:
                raise VimsError(f"kallsyms from the guest lacks {needed} (kptr_restrict?)", where=ksyms_path)
        stext, etext = symbols["_stext"]["address"], symbols["_etext"]["address"]
        if stext < KERNEL_MAP_BASE:
            raise VimsError(f"_stext at {stext:#x}: the kernel addresses are hidden (kptr_restrict?)")
        guest.scenario("normal")
        time.sleep(3.0)  # let boot-time work (static keys, deferred init) finish
        with GdbStub(*guest.gdb_address) as gdb:
            gdb.halt()
            regs = gdb.registers()
            with open(guest.memory_path, "rb") as mem:
                mem.seek(stext - KERNEL_MAP_BASE)
                text = mem.read(4096)
            probe = gdb.read(stext, 4096)
            gdb.resume()
        if text != probe:
            raise VimsError("kernel text in the RAM file differs from what the GDB stub reads (not nokaslr?)")
        la57 = bool(regs.get("cr4", 0) >> 12 & 1)
        return {
            "symbols": symbols,
            "boot_seconds": round(boot_seconds, 2),
            "accel": guest.state["accel"],
            "paging_levels": 5 if la57 else 4,
            "kernel_text": {"start": stext, "end": etext, "phys_offset": stext - KERNEL_MAP_BASE},
        }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Several test sessions may build at once: one builds, the others wait and reuse its result.
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_guest(force: bool = False, log: Callable[[str], None] | None = None) -> GuestImage:
    """Build (or reuse from the cache) the guest image; see the module docstring.

    Parameters
    ----------
    force : bool
        Rebuild even if the cache holds an image with the same key.
    log : callable, optional
        Receives one line per build step (the CLI prints them).
    """
    say = log or (lambda _msg: None)
    pkgs = resolve_packages()
    key = _cache_key(pkgs)
    directory = cache_dir("guest", pkgs["release"])
    with _locked(directory / ".lock"):
        image = GuestImage.at(directory)
        if not force and image.complete() and image.info.get("key") == key:
            return image
        return _build(directory, pkgs, key, say)


def _build(directory: Path, pkgs: dict[str, str], key: str, say: Callable[[str], None]) -> GuestImage:
    from vims.collector.btf import read_kernel_btf, to_isf
    from vims.collector.profile import make_profile

    started = time.monotonic()
    release = pkgs["release"]
    for name in ("build.json", "profile.json", "kernel-text.bin"):
        (directory / name).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache_dir("guest", "tmp")) as tmp:
        work = Path(tmp)
        say(f"fetching {pkgs['kernel_package']} {pkgs['kernel_version']} and {BUSYBOX}")
        _apt(
            ["apt-get", "download", f"{pkgs['kernel_package']}={pkgs['kernel_version']}",
             f"{BUSYBOX}={pkgs['busybox_version']}"],
            cwd=work,
        )  # fmt: skip
        for deb in work.glob("*.deb"):
            _apt(["dpkg-deb", "-x", str(deb), str(work / "pkg")])
        vmlinuz = work / "pkg" / "boot" / f"vmlinuz-{release}"
        busybox_path = work / "pkg" / "bin" / "busybox"
        if not vmlinuz.exists() or not busybox_path.exists():
            raise VimsError(f"the packages lack {vmlinuz.name} or bin/busybox", where=work)
        _check_config(work / "pkg" / "boot" / f"config-{release}")
        shutil.copyfile(vmlinuz, directory / "vmlinuz")

        say("assembling the root file system")
        busybox = busybox_path.read_bytes()
        applets = subprocess.run(
            [str(busybox_path), "--list-full"], capture_output=True, text=True, check=True
        ).stdout.split()
        tamper = find_tamper_offset(busybox)
        entries = _rootfs_entries(busybox, applets, tamper)
        _write_tree(entries, directory / "rootfs")
        archive = gzip.compress(newc(entries), compresslevel=6, mtime=0)
        (directory / "initramfs.cpio.gz").write_bytes(archive)

        say("reading structure layouts from the kernel's BTF")
        types = to_isf(read_kernel_btf(str(directory / "vmlinuz")))
        image = GuestImage.at(directory)
        image.release = release
        boot = _first_boot(image, work, say)

    metadata = {
        "release": release,
        "kernel_package": pkgs["kernel_package"],
        "kernel_version": pkgs["kernel_version"],
        "cpu": CPU_MODEL,
        "accel": boot["accel"],
        "paging_levels": boot["paging_levels"],
        "kernel_args": "nokaslr pti=off",
        "kernel_text": boot["kernel_text"],
        "producer": {"name": "vims", "version": "0.1.0", "sources": "kallsyms + BTF"},
    }
    profile = make_profile(boot["symbols"], types, metadata)
    (directory / "profile.json").write_text(json.dumps(profile, separators=(",", ":")))
    info = {
        **pkgs,
        "key": key,
        "cpu": CPU_MODEL,
        "paging_levels": boot["paging_levels"],
        "boot_seconds": boot["boot_seconds"],
        "build_seconds": round(time.monotonic() - started, 1),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tamper": {"program": f"/{TAMPER_PROGRAM}", "offset": tamper[0], "value": tamper[1]},
    }
    (directory / "build.json").write_text(json.dumps(info, indent=2))
    say(f"guest image ready in {directory} ({info['build_seconds']} s)")
    return GuestImage.at(directory)
