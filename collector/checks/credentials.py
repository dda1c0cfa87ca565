"""``credentials``: no process got root credentials the way a rootkit gives them (``linux.check_creds``).

Three findings, each a failing row naming the process:

- a process sharing its ``struct cred`` with another process (a fork makes a cred of its own; threads
  of one process share theirs): a rootkit that hands out a copy of a root process's pointer;
- a user process running on ``init_cred``, the kernel's own credentials (``init`` and every
  user process have credentials made for them);
- a process with effective uid 0 whose parent runs with a non-zero uid, unless its executable is in
  :data:`ALLOW` (the set-uid programs that do just that).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from vims.collector.checks.base import Check, Column, Context, Row
from vims.collector.memory import GuestMemoryError

#: Executables that run as root for a non-root parent by design (set-uid root programs of Debian).
ALLOW = frozenset({
    "/usr/bin/sudo", "/usr/bin/su", "/usr/bin/passwd", "/usr/bin/newgrp", "/usr/bin/chsh", "/usr/bin/chfn",
    "/usr/bin/gpasswd", "/usr/bin/mount", "/usr/bin/umount", "/usr/bin/pkexec", "/usr/bin/fusermount3",
    "/usr/bin/fusermount", "/usr/lib/dbus-1.0/dbus-daemon-launch-helper", "/usr/lib/openssh/ssh-keysign",
    "/usr/lib/polkit-1/polkit-agent-helper-1", "/usr/sbin/unix_chkpwd", "/usr/bin/crontab",
})


class Credentials(Check):
    """No process shares its credentials, runs on the kernel's, or became root under a non-root parent."""

    name = "credentials"
    cost = "light"
    symbols = ("init_cred", "init_task")
    members = (("task_struct", "cred"), ("task_struct", "real_cred"), ("task_struct", "real_parent"),
               ("cred", "uid"), ("cred", "euid"))
    #: A failing row is one process: its pid, name and executable, its uid and euid, its parent's pid
    #: and uid, its ``cred`` and the finding (``shares cred with pid N``, ``init_cred`` or
    #: ``root under non-root parent``).
    columns = (Column("pid", "int"), Column("comm"), Column("exe"), Column("uid", "int"), Column("euid", "int"),
               Column("ppid", "int"), Column("parent_uid", "int"), Column("cred", "hex"), Column("finding"))

    def run(self, ctx: Context) -> Iterator[Row]:
        kernel = ctx.kernel
        p = ctx.profile
        o_cred, o_parent = p.offset("task_struct", "cred"), p.offset("task_struct", "real_parent")
        o_uid, o_euid = p.offset("cred", "uid"), p.offset("cred", "euid")
        init_cred = kernel.symbol_address("init_cred")
        u32 = kernel.kernel.u32
        procs: list[dict[str, Any]] = []
        for addr in kernel.task_addresses():
            try:
                task = kernel.task(addr, exe=True)
                cred = kernel.u64(addr + o_cred)
                parent = kernel.u64(addr + o_parent)
                pcred = kernel.u64(parent + o_cred) if parent else 0
                procs.append({"task": task, "cred": cred, "uid": u32(cred + o_uid), "euid": u32(cred + o_euid),
                              "parent_uid": u32(pcred + o_uid) if pcred else 0})
            except GuestMemoryError:
                continue  # a process exiting under the read
        owners: dict[int, list[dict[str, Any]]] = {}
        for proc in procs:
            if proc["task"].mm:  # kernel threads run on the kernel's credentials
                owners.setdefault(proc["cred"], []).append(proc)
        bad = 0
        for proc in procs:
            task = proc["task"]
            if not task.mm:
                continue
            findings = []
            others = [o["task"].pid for o in owners[proc["cred"]] if o is not proc]
            if others:
                findings.append(f"shares cred with pid {', '.join(map(str, others))}")
            if proc["cred"] == init_cred:
                findings.append("init_cred")
            if proc["euid"] == 0 and proc["parent_uid"] != 0 and task.exe not in ALLOW:
                findings.append("root under non-root parent")
            for finding in findings:
                bad += 1
                yield self.row(f"pid {task.pid} ({task.comm})", "fail",
                               f"pid {task.pid} ({task.comm}, {task.exe or 'no executable'}) runs as uid "
                               f"{proc['uid']}/euid {proc['euid']} under pid {task.ppid} (uid {proc['parent_uid']}): "
                               f"{finding}", pid=task.pid, comm=task.comm, exe=task.exe, uid=proc["uid"],
                               euid=proc["euid"], ppid=task.ppid, parent_uid=proc["parent_uid"], cred=proc["cred"],
                               finding=finding)
        if not bad:
            users = sum(1 for proc in procs if proc["task"].mm)
            yield self.row("credentials", "pass", f"{users} user processes, each with credentials of its own; "
                           "none root under a non-root parent")
