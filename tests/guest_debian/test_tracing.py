"""Tracing the Debian guest (2 vCPUs, KASLR, PTI off and on): 10 s of system calls while ssh logins,
HTTP requests to nginx (a static page and a PHP page) and a cron job run, checked against the guest's
own ``ps`` and against the process list read from its memory.

The trace window spans a minute boundary (guest clock), so the cron job the test installs in
``/etc/cron.d`` runs inside it; the job writes its shell's pid and parent pid for the check.
"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest

from vims.collector.backends import QemuBackend
from vims.collector.guest import Guest
from vims.collector.kernel import KernelView, Task
from vims.collector.memory import PhysicalMemory
from vims.collector.recorder import TraceResult
from vims.collector.tracer import SyscallTracer

CRON_FILE = "/etc/cron.d/vims-trace-test"
CRON_PIDS = "/tmp/vims-trace-cron.pids"
CRON_JOB = "echo $$ $PPID >> " + CRON_PIDS + "; /bin/true vims-cron-job"
#: Seconds into the guest's minute at which the 10 s trace starts. Cron's job runs at about :01-:02
#: (guest clock), and the guest's clock stands still while the tracer holds the VM stopped: measured,
#: 10 s of tracing this workload moved it on by 5-7 s.
START_AT = 58


@dataclass
class Traced:
    """One trace of one guest and what the guest said about itself right after it."""

    result: TraceResult
    tracer: SyscallTracer
    rows: list[dict[str, Any]]
    ps: dict[int, tuple[int, str]]  # pid -> (ppid, comm), from ps inside the guest
    tasks: dict[int, Task]  # pid -> task (threads too), from guest memory
    cron: list[tuple[int, int]]  # (shell pid, its parent: cron's child) of each run of the job
    maps: dict[int, list[tuple[int, int, int, str]]]  # pid -> (start, end, file offset, module) of nginx
    http: list[int]  # status codes of the requests


def _ps(guest: Guest) -> dict[int, tuple[int, str]]:
    out: dict[int, tuple[int, str]] = {}
    for line in guest.run("ps -e -o pid=,ppid=,comm=", check=True).splitlines():
        fields = line.split(None, 2)
        if len(fields) == 3 and fields[0].isdigit():
            out[int(fields[0])] = (int(fields[1]), fields[2].strip())
    return out


def _maps(guest: Guest, pid: int) -> list[tuple[int, int, int, str]]:
    out = []
    for line in guest.run(f"cat /proc/{pid}/maps").splitlines():
        fields = line.split()
        if len(fields) < 6 or "-" not in fields[0]:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        out.append((start, end, int(fields[2], 16), fields[5].rsplit("/", 1)[-1]))
    return out


def _wait_for_second(guest: Guest, second: int) -> None:
    """Return when the guest's clock is at ``second`` seconds into a minute (give or take the ssh)."""
    now = float(guest.run("date +%s.%N", check=True).strip())
    wait = (second - now % 60) % 60
    time.sleep(wait if wait > 3 else wait + 60)


def _workload(guest: Guest, stop: threading.Event, http: list[int]) -> list[threading.Thread]:
    assert guest.http_address is not None
    base = "http://{}:{}".format(*guest.http_address)

    def logins() -> None:  # full logins, each its own sshd child (Guest.run shares one connection)
        while not stop.is_set():
            subprocess.run([*guest.ssh_command(), "id -un; cat /etc/hostname"], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=60, check=True)
            stop.wait(1.0)

    def requests() -> None:
        while not stop.is_set():
            for page in ("/index.html", "/index.php"):
                with urllib.request.urlopen(base + page, timeout=30) as reply:
                    reply.read()
                    http.append(reply.status)
            stop.wait(0.3)

    return [threading.Thread(target=logins), threading.Thread(target=requests)]


def _trace(guest: Guest) -> Traced:
    guest.run(f"rm -f {CRON_PIDS}; printf '%s\\n' '* * * * * root {CRON_JOB}' > {CRON_FILE}; "
              f"chmod 644 {CRON_FILE}", check=True)
    try:
        with QemuBackend.from_guest(guest) as backend:  # opened first: the traps go in right at START_AT
            tracer = SyscallTracer(backend, "debian")
            _wait_for_second(guest, START_AT)
            guest.run(f"rm -f {CRON_PIDS}")  # a run of the job during the wait (it may span a minute) is not ours
            stop, http = threading.Event(), []
            workers = _workload(guest, stop, http)
            for w in workers:
                threading.Timer(0.5, w.start).start()
            # At least 10 s, and until the cron job has run inside the window (a loaded host slows the
            # guest's minute): the job writes its pids first, then runs /bin/true.
            enough = threading.Event()

            def until_cron() -> None:
                started = time.monotonic()
                while not enough.is_set():
                    if time.monotonic() - started >= 10 and guest.run(f"cat {CRON_PIDS} 2>/dev/null").strip():
                        enough.wait(2.0)
                        break
                    enough.wait(1.0)
                enough.set()

            watcher = threading.Thread(target=until_cron)
            watcher.start()
            try:
                result = tracer.run(duration=90, stop=enough)
            finally:
                enough.set()
                watcher.join(timeout=120)
                stop.set()
                time.sleep(0.6)
                for w in workers:
                    w.join(timeout=120)
            assert backend.gdb.breakpoints() == []
        ps = _ps(guest)
        with PhysicalMemory.open(guest.memory_path) as memory:
            tasks = {t.pid: t for t in KernelView(memory, guest.profile).tasks(threads=True)}
        runs = guest.run(f"cat {CRON_PIDS} 2>/dev/null").split()
        cron = [(int(a), int(b)) for a, b in zip(runs[::2], runs[1::2], strict=False)]
        nginx = [pid for pid, (_, comm) in ps.items() if comm == "nginx"]
        maps = {pid: _maps(guest, pid) for pid in nginx}
    finally:
        guest.run(f"rm -f {CRON_FILE}")
    return Traced(result, tracer, result.events.to_pylist(), ps, tasks, cron, maps, http)


@pytest.fixture(scope="module")
def traces() -> dict[str, Traced]:
    return {}


@pytest.fixture()
def traced(any_debian: Guest, traces: dict[str, Traced]) -> Traced:
    """The trace of this guest (made once per guest, shared by the tests below)."""
    if any_debian.name not in traces:
        traces[any_debian.name] = _trace(any_debian)
    return traces[any_debian.name]


def _server(t: Traced, comm: str) -> tuple[int, set[int]]:
    """The master process of a server (parent: init) and its children, from ``ps``."""
    master = next(pid for pid, (ppid, c) in t.ps.items() if c == comm and ppid == 1)
    return master, {pid for pid, (ppid, c) in t.ps.items() if c == comm and ppid == master}


def test_every_vcpu_is_traced(traced: Traced) -> None:
    result, stats = traced.result, traced.result.stats
    assert result.method == "watchpoint" and result.reason == "interrupted"  # ended by the test, once cron ran
    assert traced.http and set(traced.http) == {200}
    per_vcpu: dict[int, set[str]] = {}
    for r in traced.rows:
        per_vcpu.setdefault(r["vcpu"], set()).add(r["comm"])
    assert set(per_vcpu) == {0, 1}
    assert all(len(comms) >= 3 for comms in per_vcpu.values()), per_vcpu
    # every row's GS base was its own vCPU's per-cpu area: registers read for the vCPU that stopped
    assert stats["vcpu_mismatch"] == 0 and stats["unreadable"] == 0
    assert stats["events"] == len(traced.rows) > 500
    assert [r["seq"] for r in traced.rows] == list(range(len(traced.rows)))


def test_identity_matches_ps_and_memory(traced: Traced) -> None:
    """pid, tgid, comm, ppid and address space of every row of a task still alive after the trace."""
    last: dict[int, dict[str, Any]] = {}
    for r in traced.rows:
        assert r["cr3"] & 0x1FFF == 0  # PCID and PTI's user-copy bit masked: the kernel's mm->pgd
        last[r["pid"]] = r
    checked = 0
    for pid, r in last.items():
        task = traced.tasks.get(pid)
        if task is None or r["nr"] in (59, 322) or task.comm != r["comm"]:
            continue  # gone, or its name changed after its last call (an exec)
        checked += 1
        assert (r["tgid"], r["cr3"]) == (task.tgid, task.cr3), (r, task)
        if pid in traced.ps:
            ppid, comm = traced.ps[pid]
            assert (r["ppid"], r["comm"]) == (ppid, comm[:15]), (r, traced.ps[pid])
    assert checked >= 8
    rows_of = {pid for pid in last if pid in traced.tasks}
    for r in traced.rows:  # every row of a live task has that task's address space
        if r["pid"] in rows_of and traced.tasks[r["pid"]].cr3 is not None and r["comm"] == last[r["pid"]]["comm"]:
            assert r["cr3"] == traced.tasks[r["pid"]].cr3, r


def test_sshd_nginx_and_php_fpm_by_pid_and_name(traced: Traced) -> None:
    rows = traced.rows
    sshd, _ = _server(traced, "sshd")
    # the listener accepted the logins; each login's own sshd is its child
    assert any(r["pid"] == sshd and r["comm"] == "sshd" for r in rows)
    assert any(r["comm"] == "sshd" and r["ppid"] == sshd for r in rows)
    for comm, page in (("nginx", "/var/www/html/index.html"), ("php-fpm8.2", "/var/www/html/index.php")):
        master, workers = _server(traced, comm)
        served = [r for r in rows if r["pid"] in workers]
        assert served and all(r["comm"] == comm and r["ppid"] == master for r in served), comm
        # the page's path read from the worker's own memory (user memory, PTI or not)
        assert any(r["path"] == page for r in served), (comm, {r["path"] for r in served})


def test_cron_children_by_pid_and_name(traced: Traced) -> None:
    rows = traced.rows
    cron, _ = _server(traced, "cron")
    assert traced.cron, "the cron job did not run in the trace window"
    shell, child = traced.cron[0]
    # cron's child (still called cron) ran the job's shell, which ran /bin/true. The child's own few calls
    # between its fork and its exec are not always in the trace under load (an open question of the
    # tracer, issue 13's note); those that are carry its identity.
    theirs = [r for r in rows if r["pid"] == child]
    assert all(r["comm"] == "cron" and r["ppid"] == cron for r in theirs), theirs[:3]
    mine = [r for r in rows if r["pid"] == shell]
    assert mine and {r["ppid"] for r in mine} == {child} and "sh" in {r["comm"] for r in mine}
    assert {r["comm"] for r in mine} <= {"cron", "sh", "true"}
    # The job's exec of /bin/true, when it fell inside the window (a loaded host slows the guest's
    # minute), names its argv and path as read from the process's memory.
    job = (shell, *(r["pid"] for r in rows if r["ppid"] == shell))
    execs = [r for r in rows if r["nr"] == 59 and r["pid"] in job]
    started = [r for r in execs if r["argv"] == "/bin/true vims-cron-job"]
    # argv is read from the process's memory after the fact: unread (None) is counted, never wrong
    assert all(r["argv"] in (None, "/bin/true vims-cron-job") for r in execs if r["path"] == "/bin/true"), execs
    assert not started or started[0]["path"] == "/bin/true", started


def test_call_sites_in_libc_name_the_program(traced: Traced) -> None:
    """nginx's tokens against its /proc/PID/maps: libc's offset, then nginx's call into libc."""
    checked = callers = 0
    for pid, maps in traced.maps.items():
        for r in (r for r in traced.rows if r["pid"] == pid and r["comm"] == "nginx"):
            where = next((m for m in maps if m[0] <= r["user_ip"] < m[1]), None)
            if where is None:
                continue
            start, _, offset, module = where
            site, _, caller = r["site"].partition("<")
            assert site == f"{module}+{r['user_ip'] - start + offset:#x}", (r["site"], where)
            checked += 1
            if caller:
                callers += 1
                name, _, off = caller.partition("+0x")
                text = [m for m in maps if m[3] == name]
                assert name == "nginx" and any(m[2] <= int(off, 16) < m[2] + m[1] - m[0] for m in text), caller
    assert checked >= 5 and callers >= 1
    sites = [r["site"] for r in traced.rows]
    # Mappings are read while the other vCPU runs: a process caught mid-exec or mid-exit may not be
    # readable for a moment; anything past a sliver means the walk is wrong.
    unread = [(r["comm"], r["pid"]) for r in traced.rows if r["site"].startswith("?")]
    assert len(unread) <= len(sites) / 100, unread[:20]
    assert sum("<" in s for s in sites) > len(sites) / 3  # most calls are made in a library
