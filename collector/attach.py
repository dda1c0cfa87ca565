"""Attach to a QEMU VM that VIMS did not start: found by its monitor, with no special launch options.

An operator's VM runs with the command line they gave it: RAM allocated inside the QEMU process, no
GDB stub, only a QMP monitor: a socket (``-qmp unix:PATH,server=on,wait=off``), or, for a libvirt
domain, libvirt's monitor pass-through (address ``libvirt:DOMAIN``). Through the monitor
(:mod:`vims.collector.qmp`), :class:`AttachedVm` finds

- **the RAM**: ``query-memdev`` names the memory backend; a shared file backend is mapped as for a
  guest of ours, otherwise the RAM is read from ``/proc/PID/mem`` at the host addresses ``gpa2hva``
  gives for each physical range of the PC layout (RAM below the PCI hole, the rest above 4 GiB);
- **the vCPUs**: the GDB stub is started at run time (HMP ``gdbserver tcp:127.0.0.1:PORT``) when a
  tracer first needs it, and stopped by :meth:`AttachedVm.detach`, leaving the VM as it was. QEMU keeps
  one stub: if the VM was started with one (``-gdb``/``-s``), it is its owner's, a second is refused
  and the error says so; a stub started at run time and left behind (an A-VM killed before it
  detached) is stopped and replaced. QEMU does not resume a VM whose debugger went away mid-stop, nor
  drop its traps: a guardian process started with the stub waits for the attaching process to end and,
  if it ended without detaching (killed), detaches in its place, so a killed A-VM leaves the VM running;
- **the kernel profile**: from the kernel image QEMU was given (``-kernel``), one the operator names,
  or, for a VM its bootloader started, the image on its own disk for the release its RAM names
  (:mod:`vims.collector.guest_disk`); built from the image's own kallsyms tables and BTF
  (:func:`vims.collector.kallsyms.build_profile`), cached by the image's SHA-256, and relocated to
  where KASLR put the kernel in this boot.

:func:`find_qemus` lists the QEMU processes of this host with what their command lines say
(``vims attach --list``); a libvirt domain among them is given its ``libvirt:DOMAIN`` monitor address.

>>> vm = parse_qemu_cmdline(123, ["qemu-system-x86_64", "-name", "web1,debug-threads=on", "-m", "1G",
...     "-smp", "2", "-kernel", "/boot/vmlinuz", "-qmp", "unix:/run/web1.qmp,server=on,wait=off"])
>>> vm.name, vm.qmp, vm.kernel, vm.memory_mb, vm.smp, vm.gdb
('web1', '/run/web1.qmp', '/boot/vmlinuz', 1024, 2, False)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vims.collector.memory import PhysicalMemory, ReaderMemory, Region, qemu_x86_regions
from vims.collector.qmp import LIBVIRT_URI, QmpError, open_monitor
from vims.errors import InputError, VimsError
from vims.net import free_port

__all__ = ["AttachedVm", "RunningQemu", "find_qemus", "kernel_release", "parse_qemu_cmdline"]


@dataclass(frozen=True)
class RunningQemu:
    """A QEMU process as its command line describes it."""

    pid: int
    name: str | None = None
    qmp: str | None = None  # a UNIX socket path, or host:port
    kernel: str | None = None
    memory_mb: int | None = None
    smp: int | None = None
    cpu: str | None = None
    gdb: bool = False  # started with a GDB stub (-gdb or -s)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, as ``vims attach --list --json`` prints it."""
        return asdict(self)


def _size_mb(text: str) -> int | None:
    value = text.split(",", 1)[0].split("=", 1)[-1].strip().upper()
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1 << 20}
    try:
        if value and value[-1] in units:
            return int(float(value[:-1]) * units[value[-1]])
        return int(float(value))
    except ValueError:
        return None


def _qmp_of(spec: str) -> str | None:
    """The address of a ``-qmp``/``-chardev socket`` spec: ``unix:PATH,...`` or ``tcp:HOST:PORT,...``."""
    head = spec.split(",", 1)[0]
    if head.startswith("unix:"):
        return head[5:]
    if head.startswith("tcp:"):
        return head[4:]
    return None


def parse_qemu_cmdline(pid: int, argv: list[str]) -> RunningQemu:
    """What the command line ``argv`` of QEMU process ``pid`` says about the VM (see the module)."""
    opts: dict[str, str] = {}
    monitors: dict[str, str] = {}  # chardev id -> socket address
    gdb = False
    qmp = None
    it = iter(argv[1:])
    for arg in it:
        key = arg.lstrip("-")
        if arg in ("-s",):
            gdb = True
            continue
        if not arg.startswith("-"):
            continue
        value = next(it, "")
        if key == "gdb":
            gdb = True
        elif key == "qmp" and qmp is None:
            qmp = _qmp_of(value)
        elif key == "chardev" and value.startswith("socket,"):
            fields = dict(f.split("=", 1) for f in value.split(",")[1:] if "=" in f)
            if "id" in fields and "path" in fields:
                monitors[fields["id"]] = fields["path"]
        elif key == "mon" and "mode=control" in value:
            fields = dict(f.split("=", 1) for f in value.split(",") if "=" in f)
            qmp = qmp or monitors.get(fields.get("chardev", ""))
        else:
            opts.setdefault(key, value)
    name = opts.get("name", "").split(",", 1)[0].removeprefix("guest=") or None
    smp = opts.get("smp", "").split(",", 1)[0].removeprefix("cpus=")
    return RunningQemu(pid, name, qmp, opts.get("kernel"), _size_mb(opts["m"]) if "m" in opts else None,
                       int(smp) if smp.isdigit() else None, opts.get("cpu", "").split(",", 1)[0] or None, gdb)


def find_qemus() -> list[RunningQemu]:
    """Every QEMU system emulator running on this host (that this user may see), by pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode(errors="replace")).name.startswith("qemu-system-"):
            found.append(parse_qemu_cmdline(int(entry.name), [a.decode(errors="replace") for a in argv if a]))
    domains = _libvirt_domains() if any(q.qmp is None for q in found) else set()
    found = [replace(q, qmp=f"libvirt:{q.name}") if q.qmp is None and q.name in domains else q for q in found]
    return sorted(found, key=lambda q: q.pid)


def _libvirt_domains(uri: str = LIBVIRT_URI) -> set[str]:
    """The running domains of the local libvirt (none when libvirt or its binding is not there)."""
    if not Path("/var/run/libvirt/libvirt-sock").exists():
        return set()
    try:
        import libvirt
    except ImportError:
        return set()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return set()
    try:
        return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
    finally:
        conn.close()


def kernel_release(vmlinuz: str | Path) -> str:
    """The release a bzImage says it is (its setup header's version string), e.g. ``6.1.0-57-amd64``."""
    data = Path(vmlinuz).read_bytes()[:0x10000]
    if len(data) < 0x210 or data[0x202:0x206] != b"HdrS":
        raise InputError("not a bzImage (no setup header): give the kernel image the VM boots", where=vmlinuz)
    pointer = struct.unpack_from("<H", data, 0x20E)[0] + 0x200
    release = data[pointer:pointer + 256].split(b" ", 1)[0].decode("ascii", "replace")
    if not release:
        raise InputError("the bzImage names no kernel version", where=vmlinuz)
    return release


class AttachedVm:
    """A running QEMU VM reached through its QMP monitor (see the module).

    Parameters
    ----------
    qmp : str, Path or (host, port)
        The VM's QMP monitor: its socket, or ``libvirt:DOMAIN[@URI]`` for a libvirt domain.
    kernel : str or Path, optional
        The kernel image the VM boots (default: QEMU's ``-kernel``, else ``/boot/vmlinuz-RELEASE`` from
        its raw disk, for the release its RAM names: :mod:`vims.collector.guest_disk`).
    rootfs : str or Path, optional
        A clean copy of the VM's root file system (a directory or an ext4 image) for the
        ``process-binaries`` check; without it that check reports that it has no reference.

    Use it as a context manager: :meth:`detach` stops the GDB stub it started and releases the RAM.
    """

    kind = "attached"

    def __init__(self, qmp: str | Path | tuple[str, int], kernel: str | Path | None = None,
                 rootfs: str | Path | None = None) -> None:
        self.qmp_address = qmp
        #: What the attachment did that the operator should know.
        self.notes: list[str] = []
        self.rootfs = None if rootfs is None else Path(rootfs)
        self._stub_started = False
        self._guardian: subprocess.Popen[bytes] | None = None
        self.gdb_address: tuple[str, int] | None = None
        # One monitor session per step, not one for the whole attachment: a QMP socket serves one client
        # at a time, and the operator's tools need theirs.
        self.qmp = open_monitor(qmp)
        try:
            self.was_running = self.qmp.execute("query-status").get("status") == "running"
            self.pid = self._qemu_pid()
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
                    if a]
            self.info = parse_qemu_cmdline(self.pid, argv)
            self.name = self.info.name or f"qemu-{self.pid}"
            self.memory = self._open_memory()
            self.kernel = Path(kernel or self.info.kernel or "")
            if not self.kernel.name:  # booted by its bootloader: the image is on its disk
                from vims.collector.guest_disk import find_kernel_image
                from vims.paths import cache_dir

                try:
                    self.kernel, release = find_kernel_image(self.qmp, self.memory, cache_dir("kernels"))
                except BaseException:
                    self.memory.close()
                    raise
                self.notes.append(f"kernel {release} read from the VM's disk (no -kernel)")
        finally:
            self.qmp.close()
        self._profile: Any = None

    # -- what it is ------------------------------------------------------------------------------
    def _qemu_pid(self) -> int:
        """QEMU's pid: the process that owns the vCPU threads the monitor names."""
        cpus = self.qmp.execute("query-cpus-fast") or []
        for cpu in cpus:
            try:
                status = Path(f"/proc/{int(cpu['thread-id'])}/status").read_text()
            except (OSError, KeyError, ValueError):
                continue
            for line in status.splitlines():
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
        raise VimsError(f"the VM behind {self.qmp.address} runs on another host or in another pid namespace "
                        "(its vCPU threads are not visible here): run the A-VM beside QEMU")

    @property
    def reference(self) -> Any:
        """What the checks compare against: the kernel image the VM boots and the ``rootfs`` given."""
        from vims.collector.checks.base import Reference

        return Reference(kernel_image=self.kernel, rootfs=self.rootfs)

    @property
    def running(self) -> bool:
        """QEMU is still there (the VM may be paused)."""
        return Path(f"/proc/{self.pid}").exists()

    def _open_memory(self) -> PhysicalMemory:
        """The RAM: a shared file backend mapped, else the process's memory at the monitor's addresses."""
        for dev in self.qmp.execute("query-memdev") or []:
            path = dev.get("mem-path")
            if path and dev.get("share") and Path(path).exists():
                return PhysicalMemory.open(path)
        summary = self.qmp.execute("query-memory-size-summary") or {}
        size = int(summary.get("base-memory", 0))
        if size <= 0:
            raise VimsError(f"the monitor of {self.name!r} gives no RAM size")
        return ReaderMemory.of_process(self.pid, self._regions(size))

    def _regions(self, size: int) -> list[Region]:
        """The physical ranges of RAM at their host addresses, checked at both ends of each range."""
        tried = []
        for machine in ("pc", "q35"):
            layout = qemu_x86_regions(size, machine)
            regions = []
            for r in layout:
                first, last = self.qmp.gpa2hva(r.paddr), self.qmp.gpa2hva(r.paddr + r.size - 1)
                if first is None or last is None or last[1] - first[1] != r.size - 1 or first[0] != last[0]:
                    break
                regions.append(Region(r.paddr, first[1], r.size))
            else:
                return regions
            tried.append(machine)
        raise VimsError(f"the RAM of {self.name!r} is not laid out as on a PC ({', '.join(tried)} layouts "
                        "do not fit what the monitor's gpa2hva says)")

    @property
    def profile(self) -> Any:
        """The kernel's profile, relocated to where this boot put the kernel (cached by image digest)."""
        from vims.collector.kaslr import is_live, relocate
        from vims.collector.profile import KernelProfile

        if self._profile is not None and is_live(self.memory, self._profile):
            return self._profile
        raw = KernelProfile.load(self._profile_file())
        self._profile = relocate(self.memory, raw, require_live=self.was_running)
        return self._profile

    def _profile_file(self) -> Path:
        from vims.collector.kallsyms import build_profile
        from vims.collector.profile import KernelProfile
        from vims.paths import cache_dir

        try:
            digest = hashlib.sha256(self.kernel.read_bytes()).hexdigest()[:24]
        except OSError as exc:
            raise InputError(f"cannot read the kernel image: {exc.strerror}", where=self.kernel) from None
        path = cache_dir("profiles") / f"{digest}.json"
        if not path.exists():
            release = kernel_release(self.kernel)
            profile = KernelProfile.from_dict(build_profile(self.kernel, release))
            tmp = path.with_suffix(".tmp")
            profile.save(tmp)
            os.replace(tmp, path)
        return path

    # -- the vCPUs -------------------------------------------------------------------------------
    def start_gdb(self) -> tuple[str, int]:
        """Start QEMU's GDB stub on a free loopback port (once), with a guardian process that undoes it
        if this process ends without detaching; the stub's address."""
        if self.gdb_address is not None:
            return self.gdb_address
        port = free_port()
        with open_monitor(self.qmp_address) as monitor:
            answer = monitor.hmp(f"gdbserver tcp:127.0.0.1:{port}")
            if "Waiting for gdb connection" not in answer and not self.info.gdb:
                # A stub started at run time and left (an A-VM killed before it detached): QEMU keeps one
                # stub only, so it is stopped and ours started. A stub from the command line is the owner's.
                monitor.hmp("gdbserver none")
                answer = monitor.hmp(f"gdbserver tcp:127.0.0.1:{port}")
                self.notes.append("stopped a GDB stub left from an earlier attachment")
        if "Waiting for gdb connection" not in answer:
            held = " (it was started with -gdb/-s: that stub is its owner's)" if self.info.gdb else ""
            raise VimsError(f"QEMU would not start a GDB stub for {self.name!r}: {answer.strip()}{held}")
        self._stub_started = True
        self.gdb_address = ("127.0.0.1", port)
        self._guardian = subprocess.Popen(
            [sys.executable, "-m", "vims.collector.attach", "guard",
             json.dumps([self.qmp_address if isinstance(self.qmp_address, tuple) else str(self.qmp_address),
                         port, self.was_running])],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        return self.gdb_address

    def backend(self, stub: bool = True, detach_on_close: bool = False) -> Any:
        """A :class:`~vims.collector.backends.QemuBackend` on this VM: with ``stub``, the GDB stub started
        for it (a tracer needs it; the checks only read memory); with ``detach_on_close``, closing the
        backend ends this attachment too."""
        from vims.collector.backends import QemuBackend

        backend = QemuBackend(self.memory, self.profile, self.start_gdb() if stub else None,
                              on_close=self.detach if detach_on_close else None)
        backend.guest = self
        return backend

    def detach(self) -> None:
        """Stop the GDB stub this attachment started and release the RAM; the VM runs on as it was."""
        try:
            if self._stub_started:
                self._stub_started = False
                self.gdb_address = None
                # QEMU gone: nothing left to stop
                with contextlib.suppress(QmpError), open_monitor(self.qmp_address) as monitor:
                    monitor.hmp("gdbserver none")
        finally:
            self.memory.close()
            guardian, self._guardian = self._guardian, None
            if guardian is not None and guardian.stdin is not None:
                with contextlib.suppress(OSError):
                    guardian.stdin.write(b"detached\n")
                    guardian.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    guardian.wait(10)

    def __enter__(self) -> AttachedVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def _guard(qmp: str | list[Any], port: int, resume: bool) -> None:
    """The guardian of an attachment (its own process, started with the stub): it waits until the
    attaching process ends, however it ends (its end of the pipe closes). Unless that process said it
    detached, it does what :meth:`AttachedVm.detach` would have: a debugger's detach on the stub (QEMU
    drops every trap and lets the vCPUs go), the stub stopped, and the VM resumed if it was running
    before the attachment."""
    if sys.stdin.read().strip() == "detached":
        return
    from vims.collector.gdbstub import GdbStub

    with contextlib.suppress(VimsError, OSError):
        GdbStub("127.0.0.1", port).close()
    address = tuple(qmp) if isinstance(qmp, list) else qmp
    with contextlib.suppress(VimsError, OSError), open_monitor(address) as monitor:
        monitor.hmp("gdbserver none")
        if resume and monitor.execute("query-status").get("status") != "running":
            monitor.execute("cont")


if __name__ == "__main__" and sys.argv[1:2] == ["guard"]:
    _guard(*json.loads(sys.argv[2]))
