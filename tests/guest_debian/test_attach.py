"""Attach to a Debian VM launched the way a user launches one: RAM inside QEMU (no memory-backend file),
no GDB stub, only a QMP socket; ssh forwarded so the test can look inside. The A-VM finds the VM by its
monitor, reads its RAM from QEMU's process, starts the GDB stub at run time, lists processes, traces
both vCPUs, runs every check and detaches, leaving the VM running without a stub; an attachment
killed mid-trace leaves it running too (its guardian detaches in its place), and the next one attaches;
the A-VM's own source traces and checks such a VM. The same VM as a libvirt domain (libvirtd from
Debian's packages, a QEMU/TCG domain) is attached through libvirt's monitor pass-through.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vims.collector.attach import AttachedVm, find_qemus
from vims.collector.checks import Context, registry, run_checks
from vims.collector.guest.debian import DebianImage
from vims.collector.guest.qemu import DEBIAN_KERNEL_ARGS, free_port
from vims.collector.qmp import LibvirtMonitor, Qmp
from vims.collector.tracer import SyscallTracer

ROOT = Path(__file__).resolve().parents[2]


class _Vm:
    """A VM the test reaches with ssh (its forward is the test's own way in; VIMS does not use it)."""

    image: DebianImage
    ssh_port: int

    def alive(self) -> bool:
        raise NotImplementedError

    def ssh(self, command: str, timeout: float = 60) -> str:
        proc = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                               "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
                               "-i", str(self.image.ssh_key), "-p", str(self.ssh_port), "root@127.0.0.1", command],
                              capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def wait_up(self, seconds: float = 600) -> None:
        deadline = time.monotonic() + seconds
        while True:
            assert self.alive(), "QEMU ended"
            try:
                self.ssh("true", timeout=30)
                return
            except (AssertionError, subprocess.TimeoutExpired):
                assert time.monotonic() < deadline, "the VM did not come up"
                time.sleep(2)


class PlainVm(_Vm):
    """A QEMU started with an ordinary command line, and ssh into it."""

    def __init__(self, image: DebianImage, folder: Path) -> None:
        self.image, self.qmp, self.ssh_port = image, folder / "qmp.sock", free_port()
        self.name = f"plain-{os.getpid()}"
        self.process = subprocess.Popen([
            "qemu-system-x86_64", "-name", self.name, "-nodefaults", "-display", "none",
            "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "1024M",
            "-kernel", str(image.kernel), "-initrd", str(image.initramfs), "-append", DEBIAN_KERNEL_ARGS,
            "-drive", f"file={image.disk},if=virtio,format=raw,snapshot=on",
            # A second disk, raw as an operator's LVM volume or disk file often is: where a VM that its
            # bootloader started keeps its kernel (the first one is a qcow2 overlay, not read).
            "-drive", f"file={image.disk},if=virtio,format=raw,readonly=on",
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=n0", "-serial", f"file:{folder / 'console.log'}",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
        ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def status(self) -> str:
        with Qmp(self.qmp) as qmp:
            return str(qmp.execute("query-status")["status"])


_DOMAIN = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>
  <cpu mode='maximum' migratable='off'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <controller type='usb' model='none'/><memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/><qemu:arg value='user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh}-:22'/>
    <qemu:arg value='-device'/><qemu:arg value='virtio-net-pci,netdev=n0,addr=0x9'/>
  </qemu:commandline>
</domain>"""


class LibvirtVm(_Vm):
    """A transient libvirt domain (QEMU/TCG, 2 vCPUs, its disk a throw-away overlay of the image), as an
    operator defines one; libvirtd holds its monitor. Only the ssh forward is passed to QEMU directly:
    libvirt's user-mode network forwards ports only with passt, and ssh is the test's way in, not VIMS's."""

    def __init__(self, image: DebianImage, folder: Path) -> None:
        import libvirt

        self.image, self.ssh_port, self.name = image, free_port(), f"vims-libvirt-{os.getpid()}"
        self.qmp = f"libvirt:{self.name}"
        disk = folder / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.disk), str(disk)],
                       check=True)  # fmt: skip
        self.conn = libvirt.open("qemu:///system")
        self.domain = self.conn.createXML(_DOMAIN.format(
            name=self.name, kernel=image.kernel, initrd=image.initramfs, cmdline=DEBIAN_KERNEL_ARGS, disk=disk,
            console=folder / "console.log", ssh=self.ssh_port))  # fmt: skip
        self.pid = int(Path(f"/var/run/libvirt/qemu/{self.name}.pid").read_text())

    def alive(self) -> bool:
        return bool(self.domain.isActive())

    def status(self) -> str:
        with LibvirtMonitor(self.name) as monitor:
            return str(monitor.execute("query-status")["status"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.domain.destroy()
        self.conn.close()


@pytest.fixture(scope="module")
def plain(debian_image: DebianImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlainVm]:
    vm = PlainVm(debian_image, tmp_path_factory.mktemp("plain"))
    try:
        vm.wait_up()
        yield vm
    finally:
        vm.process.terminate()
        vm.process.wait(30)


@pytest.fixture(scope="module")
def libvirt_vm(debian_image: DebianImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtVm]:
    """The Debian guest as a libvirt domain, on libvirtd from Debian's packages (started if not running)."""
    pytest.importorskip("libvirt", reason="libvirt's Python binding (the dev extra) is not installed")
    up = subprocess.run(["bash", str(ROOT / "scripts" / "libvirt-up.sh")], capture_output=True, text=True, check=False)
    assert up.returncode == 0, up.stderr
    vm = LibvirtVm(debian_image, tmp_path_factory.mktemp("libvirt"))
    try:
        vm.wait_up()
        yield vm
    finally:
        vm.close()


@pytest.fixture(params=["plain", "libvirt"])
def any_vm(request: pytest.FixtureRequest) -> PlainVm | LibvirtVm:
    """The same VM started either way an operator starts one: a plain QEMU command line, or libvirt."""
    vm: PlainVm | LibvirtVm = request.getfixturevalue("plain" if request.param == "plain" else "libvirt_vm")
    return vm


def _stub_listens(address: tuple[str, int]) -> bool:
    with socket.socket() as s:
        return s.connect_ex(address) == 0


def test_attach_lists_traces_checks_and_detaches(any_vm: PlainVm | LibvirtVm, debian_image: DebianImage) -> None:
    plain = any_vm
    listed = {q.pid: q for q in find_qemus()}
    assert listed[plain.pid].qmp == str(plain.qmp) and not listed[plain.pid].gdb
    with AttachedVm(plain.qmp, rootfs=debian_image.disk) as vm:
        assert vm.pid == plain.pid and vm.name == plain.name
        assert vm.memory.regions[0].offset != 0  # read from QEMU's process, not a mapped file
        backend = vm.backend()
        try:
            ps = {int(line.split()[0]): line.split()[1] for line in plain.ssh("ps -e -o pid=,comm=").splitlines()}
            tasks = {t.pid: t.comm for t in backend.kernel.tasks()}
            later = {int(line.split()[0]) for line in plain.ssh("ps -e -o pid=").splitlines()}
            for pid, name in ps.items():
                if pid in later:  # alive before and after the walk; ps adds a kernel worker's work queue
                    assert pid in tasks and (name[:15] == tasks[pid] or name.startswith(tasks[pid] + "-")), \
                        (pid, name, tasks.get(pid))
            rows = run_checks(Context.of_guest(backend), [cls() for cls in registry().values()])
            assert {r.check for r in rows} == set(registry())
            assert [(r.check, r.target, r.detail) for r in rows if r.status != "pass"] == []
            loops = plain.ssh("for i in 1 2; do setsid sh -c 'while :; do cat /proc/loadavg >/dev/null; done' "
                              ">/dev/null 2>&1 </dev/null & echo $!; done").split()
            try:
                result = SyscallTracer(backend, "plain").run(duration=10)
            finally:
                plain.ssh(f"kill {' '.join(loops)}")
            events = result.events
            assert set(events["vcpu"].to_pylist()) == {0, 1}, result.reason
            pids = set(events["pid"].to_pylist())
            assert pids & {int(p) for p in loops}, (sorted(pids), loops)
            stub = vm.gdb_address
            assert stub is not None
        finally:
            backend.close()
    assert not _stub_listens(stub)  # the stub is stopped: the VM is as it was
    assert plain.status() == "running"
    assert plain.ssh("echo alive").strip() == "alive"


def test_vims_attach_finds_and_reads_a_libvirt_domain(libvirt_vm: LibvirtVm) -> None:
    """`vims attach --list` names the domain's monitor; `vims attach libvirt:NAME` reads it; a domain
    libvirt does not have is a one-line error that lists those it has."""
    def vims(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vims.cli", "attach", *args], capture_output=True, text=True,
                              timeout=300, check=False)  # fmt: skip

    listed = vims("--list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {q["pid"]: q["qmp"] for q in json.loads(listed.stdout)}[libvirt_vm.pid] == libvirt_vm.qmp
    seen = vims(libvirt_vm.qmp, "--json")
    assert seen.returncode == 0, seen.stderr
    summary = json.loads(seen.stdout)
    assert summary["pid"] == libvirt_vm.pid and summary["memory"] == f"/proc/{libvirt_vm.pid}/mem"
    assert summary["release"] in libvirt_vm.ssh("uname -r") and summary["user_processes"] > 5
    wrong = vims("libvirt:no-such-domain", "--json")
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert "no domain 'no-such-domain'" in wrong.stderr and libvirt_vm.name in wrong.stderr
    assert libvirt_vm.status() == "running"


def test_a_kernel_not_given_is_read_from_the_vms_disk(plain: PlainVm, debian_image: DebianImage,
                                                    tmp_path: Path) -> None:
    """For a VM its bootloader started (no -kernel), the image is the disk's /boot/vmlinuz-RELEASE for the
    release the running kernel's banner in RAM names: the same bytes as the kernel the VM boots."""
    from vims.collector.guest_disk import find_kernel_image

    with AttachedVm(plain.qmp) as vm, Qmp(plain.qmp) as monitor:
        found, release = find_kernel_image(monitor, vm.memory, tmp_path)
    assert release == plain.ssh("uname -r").strip()
    assert found.read_bytes() == debian_image.kernel.read_bytes()


_KILLED = """
import sys, time
from vims.collector.attach import AttachedVm
from vims.collector.tracer import SyscallTracer
vm = AttachedVm(sys.argv[1])
backend = vm.backend()
print("tracing", flush=True)
SyscallTracer(backend, "killed").run(duration=600)
"""


def test_a_killed_attachment_leaves_the_vm_running(plain: PlainVm) -> None:
    child = subprocess.Popen([sys.executable, "-c", _KILLED, str(plain.qmp)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "tracing"
        time.sleep(3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    # Its guardian detached in its place: traps gone, the VM running, the stub stopped.
    deadline = time.monotonic() + 60
    while plain.status() != "running":
        assert time.monotonic() < deadline, plain.status()
        time.sleep(0.5)
    assert plain.ssh("echo alive", timeout=120).strip() == "alive"
    with AttachedVm(plain.qmp) as vm:  # and the next attachment starts a stub of its own
        backend = vm.backend()
        try:
            assert backend.get_vcpureg("rip") != 0
        finally:
            backend.close()
        assert vm.notes == []


def test_the_avm_traces_and_checks_an_attached_vm(plain: PlainVm, debian_image: DebianImage) -> None:
    """The A-VM's own source (what `vims avm run --qmp` runs) on the attached VM: its reports say the
    collector is alive and every check passes; stopping it leaves the VM running without a stub."""
    import threading

    import numpy as np

    from vims.avm.agent import Agent
    from vims.avm.guest_source import trace_guest
    from vims.models.stide import Stide

    rng = np.random.default_rng(0)
    model = Stide(k=3).fit([rng.integers(0, 300, size=200).tolist() for _ in range(10)])
    stop, ready = threading.Event(), threading.Event()
    failure: list[BaseException] = []
    with AttachedVm(plain.qmp, rootfs=debian_image.disk) as vm, \
            Agent(model, vm_id="vm-attached", workers=1, interval_s=2.0) as agent:

        def tracing() -> None:
            try:
                trace_guest(agent, vm, stop, checks_every=3.0, on_ready=ready.set)
            except BaseException as exc:
                failure.append(exc)
                ready.set()

        thread = threading.Thread(target=tracing)
        thread.start()
        try:
            assert ready.wait(120) and not failure, failure
            deadline = time.monotonic() + 120
            while True:
                agent.report()
                content = agent.last_content
                checks = content["checks"]
                if content["collector"]["alive"] and checks and all(c["status"] == "pass" for c in checks):
                    break
                assert time.monotonic() < deadline, (content["collector"], checks)
                time.sleep(1.0)
            assert {c["check"] for c in checks} >= {"kernel-text", "syscall-table"}
        finally:
            stop.set()
            thread.join(timeout=60)
        stub = vm.gdb_address
    assert failure == []
    assert stub is not None and not _stub_listens(stub)
    assert plain.status() == "running"


def _cli(env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "vims.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_avm_run_qmp_attests_to_rems_and_its_death_cuts(any_vm: PlainVm | LibvirtVm, tmp_path: Path) -> None:
    """`vims avm run --qmp` as an operator runs it, reporting to a real `vims remote serve`: a client
    gets through the gate on the attached VM's fresh reports; killing the A-VM cuts the open connection
    and refuses the next (fail closed), and its guardian leaves the VM running without a stub."""
    plain = any_vm
    import numpy as np

    from vims.models.persist import save_model
    from vims.models.stide import Stide
    from vims.remote.testing import read_all, read_line, wait_until

    env = {**os.environ, "VIMS_REMOTE_HOME": str(tmp_path / "rems"), "VIMS_AVM_HOME": str(tmp_path / "avm")}
    rems = _cli(env, "remote", "init", "--json")
    avm = _cli(env, "avm", "init", "--id", "avm-plain", "--json")
    gate = free_port()
    policy = tmp_path / "policy.json"  # the behaviour model is a stand-in: only the evidence is judged
    policy.write_text(json.dumps({"interval_s": 2.0, "deadline_s": 15.0, "attest_timeout_s": 30.0,
                                  "threshold": 0.0, "checks": [{"check": "syscall-table", "every_s": 5.0}]}))
    _cli(env, "remote", "enroll", avm["public_key_file"], "--vm", "vm-plain", "--gate-port", str(gate),
         "--policy", str(policy), "--json")
    rng = np.random.default_rng(0)
    model = tmp_path / "stide.skops"
    save_model(Stide(k=3).fit([rng.integers(0, 300, size=200).tolist() for _ in range(10)]), model)
    server = subprocess.Popen([sys.executable, "-m", "vims.cli", "remote", "serve", "--control",
                               f"tcp://127.0.0.1:{free_port()}", "--demo-service", "--metrics-port", "0",
                               "--seconds", "900", "--quiet", "--json"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    agent: subprocess.Popen[str] | None = None
    reports = tmp_path / "reports.jsonl"
    try:
        assert server.stdout is not None
        info = json.loads(server.stdout.readline())
        agent = subprocess.Popen([sys.executable, "-m", "vims.cli", "avm", "run", "--qmp", str(plain.qmp),
                                  "--model", str(model), "--workers", "1", "--remote", info["control"],
                                  "--keys", str(tmp_path / "avm" / "avm.secret.json"),
                                  "--server-key", rems["public_key_file"], "--vm-id", "vm-plain",
                                  "--output", str(reports)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip

        def ready() -> bool:  # the A-VM's own reports: tracing, checked and scored
            assert agent is not None and agent.poll() is None, agent.stderr.read() if agent.stderr else ""
            lines = reports.read_text().splitlines() if reports.exists() else []
            last = json.loads(lines[-1]) if lines else {}
            return bool(last) and last["collector"].get("alive") is True and last["behaviour"]["score"] is not None \
                and any(c["check"] == "syscall-table" and c["status"] == "pass" for c in last["checks"])

        wait_until(ready, timeout=600, what="the A-VM tracing, checking and scoring the attached VM")
        hist = _cli(env, "remote", "history", "vm-plain", "--json")
        assert any(r["status"] == "accepted" for r in hist["reports"]), hist["reports"]
        conn = socket.create_connection(("127.0.0.1", gate), timeout=120)
        conn.settimeout(120)
        conn.sendall(b"over the gate\n")
        assert read_line(conn) == b"data: over the gate\n"
        agent.send_signal(signal.SIGKILL)
        agent.wait(30)
        assert read_all(conn).startswith(b"\nVIMS CUT no fresh report")
        with socket.create_connection(("127.0.0.1", gate), timeout=120) as again:
            again.settimeout(120)
            assert read_all(again).startswith(b"VIMS DENY")
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait(30)
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=60)
    kinds = [d["kind"] for d in _cli(env, "remote", "history", "vm-plain", "--json")["decisions"]][::-1]
    assert kinds[:2] == ["allow", "cut"] and kinds[-1] == "deny", kinds
    # The guardian detached in the killed agent's place.
    wait_until(lambda: plain.status() == "running", timeout=60, what="the VM running again")
    assert plain.ssh("echo alive", timeout=120).strip() == "alive"
