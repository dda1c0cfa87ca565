"""The forensics checks (kernel-modules, idt, credentials, notifiers, net-ops, ftrace-hooks) on the real
Debian guest: clean, they pass; with the test rootkit (``rootkit/vims_rk.c``, built here from Debian's
headers for the guest's kernel) or a gate of the IDT patched from outside, they fail naming what changed;
unloading the rootkit restores a clean result. Every test restores what it changes (the guest is shared).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.guest_debian.halting import halted_in_kernel
from vims.collector.backends import QemuBackend
from vims.collector.checks import Context, Reference, registry, run_checks
from vims.collector.checks.idt import GATE, handler
from vims.collector.checks.kernel_modules import ModuleMap
from vims.collector.gdbstub import GdbStub
from vims.collector.guest import Guest
from vims.collector.guest.debian import DebianImage
from vims.collector.isf import write_isf
from vims.collector.kernel import KernelView
from vims.collector.memory import PhysicalMemory
from vims.collector.profile import KernelProfile
from vims.paths import cache_dir

FORENSICS = ("kernel-modules", "idt", "credentials", "notifiers", "net-ops", "ftrace-hooks")
ROOTKIT = Path(__file__).resolve().parent / "rootkit"
#: The Debian packages that build a module for kernel RELEASE (Kbuild, the headers, the config).
HEADER_PACKAGES = ("linux-headers-{release}", "linux-headers-{common}", "linux-kbuild-{major}")
NR_KILL = 62


@contextmanager
def checks_of(guest: Guest, image: DebianImage) -> Iterator[Context]:
    with QemuBackend.from_guest(guest) as backend:
        yield Context(backend, Reference(rootfs=image.disk), cpu=guest.state.get("cpu"))


def run(ctx: Context, *names: str) -> list[Any]:
    return run_checks(ctx, [registry()[name]() for name in names])


class _Snapshot:
    """A backend-like view of a memory snapshot: what a :class:`Context` asks of a backend."""

    def __init__(self, kernel: KernelView) -> None:
        self.kernel = kernel


def failures(rows: list[Any]) -> list[Any]:
    return [r for r in rows if r.status != "pass"]


def test_a_clean_debian_guest_passes_the_forensics_checks(any_debian: Guest, debian_image: DebianImage) -> None:
    with checks_of(any_debian, debian_image) as ctx:
        rows = run(ctx, *FORENSICS)
    assert {r.check for r in rows} == set(FORENSICS)
    assert not failures(rows), failures(rows)
    detail = {r.check: r.detail for r in rows}
    assert int(detail["idt"].split()[1]) > 200  # all 256 vectors have a gate on x86-64 Linux
    assert int(detail["net-ops"].split()[1]) > 50  # tcp_prot alone has dozens
    assert int(detail["credentials"].split()[0]) > 5  # systemd, sshd, nginx, cron, ...
    assert int(detail["kernel-modules"].split()[0]) > 0  # the initramfs loads a few (virtio, ext4)


def test_an_idt_gate_patched_from_outside_fails_naming_the_vector(debian: Guest, debian_image: DebianImage) -> None:
    vector = 0x80  # int 0x80, the 32-bit system call gate: a 64-bit Debian guest does not use it
    with checks_of(debian, debian_image) as ctx:
        gate = ctx.kernel.symbol_address("idt_table") + vector * GATE
        original = ctx.kernel.read(gate, GATE)
        evil = 0xFFFFFFFFC0DE0000 + 0x1230  # module space no module owns
        _low, seg, bits, _mid, _high, res = struct.unpack("<HHHHII", original)
        patched = struct.pack("<HHHHII", evil & 0xFFFF, seg, bits, (evil >> 16) & 0xFFFF, evil >> 32, res)
        assert handler(patched) == (evil, True)
        with halted_in_kernel(debian) as (gdb, vcpu):
            gdb.write(gate, patched, vcpu)
            try:
                rows = run(ctx, "idt")
            finally:
                gdb.write(gate, original, vcpu)
        assert [(r.status, r.fields["vector"], r.fields["handler"], r.fields["owner"]) for r in rows] == [
            ("fail", vector, evil, "none")]
        assert not failures(run(ctx, "idt"))


# -- the test rootkit --------------------------------------------------------------------------------------
def headers_for(release: str) -> Path:
    """Debian's build tree for kernel ``release`` (``6.1.0-57-amd64``), downloaded and unpacked once into
    the VIMS cache: ``apt-get download`` of the headers, their common part and Kbuild, ``dpkg -x``."""
    for tool in ("apt-get", "dpkg", "make", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: building the test rootkit needs Debian's tools")
    flavour = release.rsplit("-", 1)
    common = f"{flavour[0]}-common"
    major = ".".join(release.split(".")[:2])
    root = cache_dir() / "kernel-headers" / release
    tree = root / "usr" / "src" / f"linux-headers-{release}"
    if (tree / "Makefile").exists():
        return tree
    work = root.with_name(release + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    packages = [p.format(release=release, common=common, major=major) for p in HEADER_PACKAGES]
    got = subprocess.run(["apt-get", "download", *packages], cwd=work, capture_output=True, text=True, timeout=600)
    if got.returncode != 0:
        pytest.skip(f"cannot download {', '.join(packages)}: {got.stderr.strip()[-300:]}")
    for deb in work.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(work / "root")], check=True, timeout=300)
    # The flavour's Makefile includes the common tree by its absolute /usr/src path: point it here.
    unpacked = work / "root" / "usr" / "src"
    makefile = unpacked / f"linux-headers-{release}" / "Makefile"
    makefile.write_text(makefile.read_text().replace("/usr/src/", f"{root / 'usr' / 'src'}/"))
    shutil.rmtree(root, ignore_errors=True)
    (work / "root").rename(root)
    shutil.rmtree(work, ignore_errors=True)
    return tree


@pytest.fixture(scope="session")
def rootkit(debian: Guest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``vims_rk.ko`` built for the running guest's kernel with the system compiler."""
    release = debian.run("uname -r", check=True).strip()
    tree = headers_for(release)
    build = tmp_path_factory.mktemp("rootkit")
    for name in ("vims_rk.c", "Kbuild"):
        shutil.copy(ROOTKIT / name, build / name)
    made = subprocess.run(["make", "-C", str(tree), f"M={build}", "modules"], capture_output=True, text=True,
                          timeout=600)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    return build / "vims_rk.ko"


def copy_in(guest: Guest, local: Path, remote: str) -> None:
    subprocess.run([*guest.ssh_command(), f"cat > {remote}"], input=local.read_bytes(), check=True, timeout=120,
                   capture_output=True)


def test_the_rootkit_is_named_by_every_relevant_check_and_unloading_it_restores_a_clean_result(
        debian: Guest, debian_image: DebianImage, rootkit: Path) -> None:
    copy_in(debian, rootkit, "/root/vims_rk.ko")
    # A process of nobody under a parent of nobody (sh waits for its sleep), to be given root by the module.
    debian.run("setsid setpriv --reuid=65534 --regid=65534 --clear-groups -- sh -c 'sleep 900; true' "
               "</dev/null >/dev/null 2>&1 &", check=True)
    pid = int(debian.run("for i in 1 2 3 4 5 6 7 8 9 10; do p=$(pgrep -u 65534 -x sleep) && break; sleep 0.5; "
                         "done; echo $p", check=True).split()[-1])
    loaded = False
    try:
        debian.run(f"insmod /root/vims_rk.ko root_pid={pid}", check=True)
        loaded = True
        assert "vims_rk" not in debian.run("cat /proc/modules", check=True)  # hidden from lsmod
        assert debian.run(f"awk '/^Uid/{{print $3}}' /proc/{pid}/status", check=True).strip() == "0"
        with checks_of(debian, debian_image) as ctx:
            rows = failures(run(ctx, "kernel-modules", "syscall-table", "credentials", "idt", "notifiers",
                                "net-ops", "ftrace-hooks"))
        by = {r.check: r for r in rows}
        assert set(by) == {"kernel-modules", "syscall-table", "credentials"}, rows
        assert [(r.fields["module"], r.fields["missing_from"]) for r in rows if r.check == "kernel-modules"] == [
            ("vims_rk", "module list")]
        hooked = [r for r in rows if r.check == "syscall-table"]
        assert [(r.fields["nr"], r.fields["syscall"]) for r in hooked] == [(NR_KILL, "kill")]
        assert hooked[0].fields["points_to"].startswith("vims_rk+") and "hidden module" in hooked[0].detail
        creds = [r for r in rows if r.check == "credentials"]
        assert [(r.fields["pid"], r.fields["euid"], r.fields["parent_uid"], r.fields["finding"]) for r in creds] == [
            (pid, 0, 65534, "root under non-root parent")]
        # Unhide (through the module's sysfs parameter) and unload: the table entry goes back.
        debian.run("echo 1 > /sys/module/vims_rk/parameters/unhide && rmmod vims_rk", check=True)
        loaded = False
    finally:
        if loaded:  # a failed assertion above: still take the module out of the shared guest
            debian.run("echo 1 > /sys/module/vims_rk/parameters/unhide; rmmod vims_rk")
        debian.run(f"kill -9 {pid}; pkill -u 65534 -x sh")
    assert "vims_rk" not in debian.run("cat /proc/modules", check=True)
    with checks_of(debian, debian_image) as ctx:
        after = run(ctx, "kernel-modules", "syscall-table", "credentials")
    assert not failures(after), failures(after)


# -- Volatility 3 as the judge ------------------------------------------------------------------------------
def snapshot(guest: Guest, into: Path) -> Path:
    """A copy of the guest's RAM file taken while every vCPU is stopped (a consistent memory image)."""
    path = into / "ram.raw"
    with GdbStub(*guest.gdb_address) as gdb:
        gdb.halt()
        try:
            shutil.copyfile(guest.memory_path, path)
        finally:
            gdb.resume()
    return path


def volatility(image: Path, symbols: Path, plugin: str) -> list[dict[str, Any]]:
    """The rows of Volatility 3's ``plugin`` on ``image`` (its JSON renderer), children flattened."""
    vol = shutil.which("vol", path=str(Path(sys.executable).parent)) or shutil.which("vol")
    if vol is None:
        pytest.skip("volatility3 is not installed (pip install -e '.[dev]')")
    done = subprocess.run([vol, "-q", "-r", "json", "-s", str(symbols), "-f", str(image), plugin],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows: list[dict[str, Any]] = []
    stack = list(json.loads(done.stdout))
    while stack:
        row = stack.pop()
        stack.extend(row.pop("__children", []) or [])
        rows.append(row)
    return rows


def test_volatility_and_vims_see_the_same_processes_modules_and_syscall_table(
        debian_qemu64: Guest, debian_image: DebianImage, tmp_path: Path) -> None:
    # qemu64 offers no LA57: 4-level page tables, which Volatility 3 reads (-cpu max's 5 levels it cannot)
    debian = debian_qemu64
    profile = KernelProfile.load(debian_image.profile)
    symbols = tmp_path / "symbols"
    write_isf(profile, symbols)
    image = snapshot(debian, tmp_path)
    with PhysicalMemory.open(image) as memory:
        kernel = KernelView(memory, profile)
        # Volatility's pslist leaves out a task it finds invalid, among them one whose nsproxy is NULL:
        # a process in do_exit past exit_task_namespaces (an ssh session closing as the snapshot was
        # taken; seen here). Such a task is still on the kernel's list, which VIMS reads as it is; the
        # comparison is of the others, and any other difference fails.
        nsproxy = profile.offset("task_struct", "nsproxy")
        exiting = {(t.pid, t.comm) for t in kernel.tasks() if kernel.u64(t.addr + nsproxy) == 0}
        ours = {(t.pid, t.comm) for t in kernel.tasks()} - exiting
        modules = {m.name for m in ModuleMap.read(kernel).modules if m.listed}
        table = run_checks(Context(_Snapshot(kernel)), [registry()["syscall-table"]()])
        entries = kernel.read(kernel.symbol_address("sys_call_table"), 8 * 512)
    theirs = {(int(r["PID"]), str(r["COMM"])) for r in volatility(image, symbols, "linux.pslist")}
    ours.discard((0, "swapper/0"))  # pslist starts from init_task's list, without init_task itself
    assert theirs == ours, (sorted(theirs - ours), sorted(ours - theirs))
    lsmod = {str(r["Module Name"]) for r in volatility(image, symbols, "linux.lsmod")}
    assert lsmod == modules and len(modules) > 5
    # The handlers' addresses, not their names: Volatility names an address by any of its aliases.
    low48 = (1 << 48) - 1
    theirs_table = {int(r["Index"]): int(r["Handler Address"]) & low48
                    for r in volatility(image, symbols, "linux.check_syscall") if r["Table Name"] == "64bit"}
    ours_table = {nr: int.from_bytes(entries[8 * nr:8 * nr + 8], "little") & low48 for nr in theirs_table}
    assert theirs_table == ours_table and len(theirs_table) > 400
    assert [r.status for r in table] == ["pass"]
