"""Attach to a Debian VM launched the way a user launches one: RAM inside QEMU (no memory-backend file),
no GDB stub, only a QMP socket; ssh forwarded so the test can look inside. The A-VM finds the VM by its
monitor, reads its RAM from QEMU's process, starts the GDB stub at run time, lists processes, traces
both vCPUs, runs every check and detaches, leaving the VM running without a stub; an attachment
killed mid-trace leaves it running too (its guardian detaches in its place), and the next one attaches;
the A-VM's own source traces and checks such a VM.
"""

from __future__ import annotations

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
from vims.collector.qmp import Qmp
from vims.collector.tracer import SyscallTracer


class PlainVm:
    """A QEMU started with an ordinary command line, and ssh into it."""

    def __init__(self, image: DebianImage, folder: Path) -> None:
        self.image, self.qmp, self.ssh_port = image, folder / "qmp.sock", free_port()
        self.name = f"plain-{os.getpid()}"
        self.process = subprocess.Popen([
            "qemu-system-x86_64", "-name", self.name, "-nodefaults", "-display", "none",
            "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "1024M",
            "-kernel", str(image.kernel), "-initrd", str(image.initramfs), "-append", DEBIAN_KERNEL_ARGS,
            "-drive", f"file={image.disk},if=virtio,format=raw,snapshot=on",
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=n0", "-serial", f"file:{folder / 'console.log'}",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
        ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

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
            assert self.process.poll() is None, "QEMU ended"
            try:
                self.ssh("true", timeout=30)
                return
            except (AssertionError, subprocess.TimeoutExpired):
                assert time.monotonic() < deadline, "the plain VM did not come up"
                time.sleep(2)

    def status(self) -> str:
        with Qmp(self.qmp) as qmp:
            return str(qmp.execute("query-status")["status"])


@pytest.fixture(scope="module")
def plain(debian_image: DebianImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlainVm]:
    vm = PlainVm(debian_image, tmp_path_factory.mktemp("plain"))
    try:
        vm.wait_up()
        yield vm
    finally:
        vm.process.terminate()
        vm.process.wait(30)


def _stub_listens(address: tuple[str, int]) -> bool:
    with socket.socket() as s:
        return s.connect_ex(address) == 0


def test_attach_lists_traces_checks_and_detaches(plain: PlainVm, debian_image: DebianImage) -> None:
    listed = {q.pid: q for q in find_qemus()}
    assert listed[plain.process.pid].qmp == str(plain.qmp) and not listed[plain.process.pid].gdb
    with AttachedVm(plain.qmp, rootfs=debian_image.disk) as vm:
        assert vm.pid == plain.process.pid and vm.name == plain.name
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
