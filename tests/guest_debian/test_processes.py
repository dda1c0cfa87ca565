"""The process list from guest memory against ``ps`` inside the guest, with PTI off and on."""

from __future__ import annotations

import time

from vims.collector.gdbstub import GdbStub
from vims.collector.guest import Guest
from vims.collector.kernel import KernelView
from vims.collector.memory import PhysicalMemory, pgd_base


def _ps(guest: Guest) -> dict[int, str]:
    rows = guest.run("ps -e -o pid=,comm=", check=True).splitlines()
    return {int(r.split(None, 1)[0]): r.split(None, 1)[1].strip() for r in rows if r.strip()}


def test_process_list_matches_ps(any_debian: Guest) -> None:
    before = _ps(any_debian)
    with PhysicalMemory.open(any_debian.memory_path) as memory:
        tasks = {t.pid: t for t in KernelView(memory, any_debian.profile).tasks(exe=True)}
    after = _ps(any_debian)
    stable = {pid: name for pid, name in before.items() if after.get(pid) == name}
    for pid, name in stable.items():
        assert pid in tasks, (pid, name)
        comm = tasks[pid].comm
        # ps shows a kernel worker's current work queue after a dash; comm is cut at 15 bytes
        assert name[:15] == comm or name.startswith(comm + "-"), (pid, name, comm)
    names = {t.comm for t in tasks.values()}
    for needed in ("systemd", "sshd", "nginx", "php-fpm8.2", "cron"):
        assert needed in names, needed
    assert tasks[1].comm == "systemd" and tasks[1].exe == "/usr/lib/systemd/systemd"


def test_cr3_of_a_busy_process_identifies_it(any_debian: Guest) -> None:
    """A vCPU stopped in a user-space loop: its CR3 (PCID, PTI bit) names the loop's address space."""
    loop = "setsid nohup sh -c 'while :; do :; done' >/dev/null 2>&1 </dev/null & echo $!"
    pid = int(any_debian.run(loop, check=True))
    try:
        assert any_debian.run(f"sleep 1; ps -o stat= -p {pid}").strip().startswith("R")
        with PhysicalMemory.open(any_debian.memory_path) as memory:
            view = KernelView(memory, any_debian.profile)
            task = next(t for t in view.tasks() if t.pid == pid)
            assert task.cr3 is not None
            with GdbStub(*any_debian.gdb_address) as gdb:
                for _ in range(100):  # until a vCPU is caught in the loop's user code
                    gdb.halt()
                    hits = []
                    for vcpu in gdb.vcpus():
                        regs = gdb.registers(vcpu)
                        if regs["rip"] >> 47 == 0 and pgd_base(regs["cr3"]) == task.cr3:
                            hits.append((regs, gdb.read(regs["rip"], 16, vcpu)))
                    gdb.resume()
                    if hits:
                        break
                    time.sleep(0.2)
            assert hits, "no vCPU stopped in the busy loop"
            regs, code = hits[0]
            assert view.read_user(regs["cr3"], regs["rip"], 16) == code
            pti = "pti=on" in any_debian.state.get("kernel_args", "")
            assert bool(regs["cr3"] & 0x1000) == pti  # the user copy of the tables under PTI
    finally:
        any_debian.run(f"kill {pid}")
