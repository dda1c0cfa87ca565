"""The backend-neutral half of system-call tracing: one trapped call, its registers known, into a row.

Whatever trapped the call (the GDB stub's watchpoint, LibVMI's INT3), :class:`EventRecorder` does
the rest from guest memory through :class:`~vims.collector.kernel.KernelView`: the current task
(per-cpu ``current_task``), its identity (cached per task, re-read after ``execve``, ``exit``,
``prctl(PR_SET_NAME)`` and when CR3 changes), the path argument of calls that take one, the
command line of an ``execve`` and the call site token (:mod:`vims.collector.callsite`). It applies
the policy's program filter and rate cap, and gathers rows into Arrow record batches of
:data:`vims.schemas.EVENT_SCHEMA`, handed to ``on_batch`` (e.g.
:meth:`vims.collector.stream.BatchSender.send`) every ``batch_rows`` events or ``batch_ms``
milliseconds. :class:`RecordingTracer` is what every tracer that owns such a recorder shares: the
policy REM-S may change while it runs, and the guest's call names.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vims.collector.callsite import REMAP_CALLS, CallSites
from vims.collector.memory import GuestMemoryError
from vims.collector.syscall_table import guest_syscall_names
from vims.errors import VimsError
from vims.schemas import EVENT_SCHEMA
from vims.syscalls import EXECVE_CALLS, EXIT_CALLS
from vims.syscalls import names as syscall_names
from vims.tracing_policy import Policy, Sampler

#: The longest command line kept in the ``argv`` column.
ARGV_LIMIT = 512

#: System calls that take a path, by name, and which argument holds it (x86-64; the numbers come
#: from the guest's own ``sys_call_table`` when it can be read, else from the x86-64 ABI
#: table of :mod:`vims.syscalls`).
PATH_ARGS: dict[str, int] = {
    "open": 0, "stat": 0, "lstat": 0, "access": 0, "execve": 0, "truncate": 0, "chdir": 0, "rename": 0,
    "mkdir": 0, "rmdir": 0, "creat": 0, "link": 0, "unlink": 0, "symlink": 1, "readlink": 0, "chmod": 0,
    "chown": 0, "lchown": 0, "utime": 0, "mknod": 0, "uselib": 0, "statfs": 0, "pivot_root": 0,
    "chroot": 0, "acct": 0, "mount": 1, "umount2": 0, "swapon": 0, "swapoff": 0, "setxattr": 0,
    "lsetxattr": 0, "getxattr": 0, "lgetxattr": 0, "listxattr": 0, "llistxattr": 0, "removexattr": 0,
    "lremovexattr": 0, "utimes": 0, "inotify_add_watch": 1, "openat": 1, "mkdirat": 1, "mknodat": 1,
    "fchownat": 1, "futimesat": 1, "newfstatat": 1, "unlinkat": 1, "renameat": 1, "linkat": 1,
    "symlinkat": 2, "readlinkat": 1, "fchmodat": 1, "faccessat": 1, "utimensat": 1, "renameat2": 1,
    "execveat": 1, "statx": 1, "openat2": 1, "faccessat2": 1,
}

#: prctl(PR_SET_NAME, ...) renames the task (busybox does it after re-running itself as an applet).
PRCTL, PR_SET_NAME = 157, 15
#: execve(path, argv, envp) has argv second; execveat(dirfd, path, argv, ...) third.
EXECVE = 59
#: Bits of CR3 that hold the page-table root (the rest: PCID, no-flush); under PTI bit 12 is cleared
#: too (:meth:`~vims.collector.kernel.KernelView.space`).
CR3_MASK = 0x000F_FFFF_FFFF_F000
#: Consecutive stops whose task cannot be read before the trace ends (the guest is rebooting).
MAX_UNREADABLE = 50


@dataclass
class TraceResult:
    """What a trace produced, and why it ended."""

    events: pa.Table
    reason: str
    method: str
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Identity:
    pid: int
    tgid: int
    ppid: int
    comm: str
    mm: int
    cr3: int


def read_argv(view: Any, cr3: int, argv: int, limit: int = ARGV_LIMIT) -> str | None:
    """The command line at user address ``argv`` (a NULL-terminated array of strings), or None."""
    space = view.space(cr3)
    words: list[str] = []
    total = 0
    try:
        for i in range(64):
            ptr = space.u64(argv + 8 * i)
            if not ptr:
                break
            word = space.read_cstring(ptr, limit).decode("utf-8", "surrogateescape")
            words.append(word)
            total += len(word) + 1
            if total >= limit:
                break
    except GuestMemoryError:
        if not words:
            return None
    return " ".join(words)[:limit]


def _text(value: str | None) -> str | None:
    """``value`` as valid UTF-8 text: bytes that are not UTF-8 (kept as surrogates) become ``\\xNN``."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


class _Rows:
    """Columns being filled, turned into a record batch when full or old enough."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.seq: list[int] = []
        self.ts: list[int] = []
        self.vcpu: list[int] = []
        self.pid: list[int] = []
        self.tgid: list[int] = []
        self.comm: list[str] = []
        self.cr3: list[int] = []
        self.nr: list[int] = []
        self.args: list[tuple[int, ...]] = []
        self.ip: list[int] = []
        self.path: list[str | None] = []
        self.ppid: list[int] = []
        self.argv: list[str | None] = []
        self.site: list[str | None] = []

    def __len__(self) -> int:
        return len(self.seq)

    def batch(self, vm_id: str) -> pa.RecordBatch:
        n = len(self.seq)
        flat = [a for row in self.args for a in row]
        arrays = [
            pa.array(self.seq, pa.uint64()), pa.array(self.ts, pa.uint64()),
            pa.array([vm_id] * n, pa.string()), pa.array(self.vcpu, pa.uint16()),
            pa.array(self.pid, pa.int32()), pa.array(self.tgid, pa.int32()), pa.array(self.comm, pa.string()),
            pa.array(self.cr3, pa.uint64()), pa.array(self.nr, pa.int32()),
            pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint64()), 6),
            pa.array(self.ip, pa.uint64()), pa.array(self.path, pa.string()), pa.array(self.ppid, pa.int32()),
            pa.array(self.argv, pa.string()), pa.array(self.site, pa.string()),
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=EVENT_SCHEMA)


class GuestUnreadableError(VimsError):
    """Too many stops in a row whose task could not be read: the guest is rebooting (or not Linux 6.1)."""


#: With nothing to hand over, an empty batch (a heartbeat) goes out this often (nanoseconds).
HEARTBEAT_NS = 1_000_000_000


class EventRecorder:
    """Everything done for one trapped system call once its registers are known, for any backend.

    It reads the process identity (cached per task), the path argument, the command line of an
    ``execve`` and the call site, applies the policy's program filter and rate cap, and gathers rows
    into record batches handed to ``on_batch``.

    Parameters
    ----------
    view : KernelView
        The guest's kernel.
    vm_id : str
        Written in every row.
    policy : Policy
        Sampling (the recorder applies the program filter and the cap; the trap owner the duty cycle).
    callsites : bool
        Fill the ``site`` column.
    batch_rows, batch_ms, on_batch, keep
        See :class:`vims.collector.tracer.SyscallTracer`.
    """

    def __init__(self, view: Any, vm_id: str, policy: Policy, callsites: bool = True, batch_rows: int = 2048,
                 batch_ms: int = 250, on_batch: Callable[[pa.RecordBatch], Any] | None = None,
                 keep: bool = True) -> None:
        self.view = view
        self.vm_id = vm_id
        self.policy = policy
        self.on_batch = on_batch
        self.keep = keep
        self.batch_rows = batch_rows
        self.batch_ns = batch_ms * 1_000_000
        #: Notes for the user: fallbacks taken.
        self.notes: list[str] = []
        self.names = guest_syscall_names(view, view.profile)
        if not self.names:
            self.notes.append("sys_call_table unreadable: syscall numbers from the x86-64 ABI")
        by_name = ({name: nr for nr, name in self.names.items()}
                   or {name: nr for nr, name in enumerate(syscall_names()) if name})
        self.path_args = {by_name[name]: arg for name, arg in PATH_ARGS.items() if name in by_name}
        self.callsites = CallSites(view) if callsites else None
        if self.callsites is not None and self.callsites.mode != "vma":
            self.notes.append(self.callsites.reason)
        self.start_ns = time.monotonic_ns()
        self.sampler = Sampler(policy, self.start_ns)
        self.rows = _Rows()
        self.batches: list[pa.RecordBatch] = []
        self.last_batch = self.start_ns
        self.stats: dict[str, Any] = {"trapped": 0, "events": 0, "filtered": 0, "capped": 0,
                                      "path_unreadable": 0, "identity_reads": 0, "unreadable": 0,
                                      "batches": 0, "heartbeats": 0}
        self._last_handed = self.start_ns
        self._identities: dict[int, _Identity] = {}
        self._seq = 0
        self._unreadable = 0

    def switch_policy(self, policy: Policy, now: int) -> None:
        """Record by ``policy`` from ``now`` (monotonic ns) on, keeping the counts taken so far (REM-S
        changes the policy of a running trace)."""
        old = self.sampler
        self.policy = policy
        self.sampler = Sampler(policy, now)
        self.sampler.filtered, self.sampler.capped = old.filtered, old.capped

    def restart_clock(self) -> None:
        """Start the policy's clock (and the rate) now."""
        self.start_ns = self.last_batch = time.monotonic_ns()
        self.sampler = Sampler(self.policy, self.start_ns)

    def _identity(self, task: int, cr3: int, who: tuple[int, int, str] | None = None) -> _Identity:
        """The identity of ``task``, cached by its address. The cache is checked at every call against the
        task's pid and comm (``who`` when the trap read them): a task that exited without its exit
        traced leaves its address, and often its page-table root, to the next task, and an exec whose
        call was not traced changes the program."""
        ident = self._identities.get(task)
        if ident is not None and ident.cr3 == cr3:
            pid, comm = (who[0], who[2]) if who is not None else self.view.task_pid_comm(task)
            if pid != ident.pid or comm != ident.comm[:15]:
                ident = None
        if ident is None or ident.cr3 != cr3:
            t = self.view.task(task)
            self.stats["identity_reads"] += 1
            ident = _Identity(t.pid, t.tgid, t.ppid, t.comm, t.mm, cr3)
            if len(self._identities) > 65536:
                self._identities.clear()
            self._identities[task] = ident
        return ident

    def record(self, vcpu: int, nr: int, args: tuple[int, ...], ip: int, gs_base: int, cr3: int,
               ts_ns: int, user_sp: int = 0, task: int | None = None,
               who: tuple[int, int, str] | None = None, path_text: str | None = None,
               argv_text: str | None = None, ppid: int | None = None) -> bool:
        """Turn one trapped call into a row; ``False`` if it was not kept (filter, cap, unreadable task).

        ``gs_base`` and ``cr3`` are those of the vCPU that made the call (its kernel GS base names
        the task; its CR3, PCID and PTI's user-copy bit masked off, the address space).
        ``user_sp``, the user stack pointer at the call, lets a call made inside a library name its
        caller in the main program (:meth:`~vims.collector.callsite.CallSites.token`); 0 if unknown.
        ``task``: the current task when the trap read it at the call (the QEMU plugin does; 0: it
        could not), else it is read now from ``gs_base``. ``who``: the task's (pid, tgid, comm) when
        the trap read them at the call; the row then says those (the cached identity gives ppid and
        mm). ``path_text`` and ``argv_text``: the path argument and command line when the trap read
        them at the call (else they are read now). ``ppid``: the parent's tgid when the trap read it at
        the call (else the cached identity's, read at the task's first call).

        Raises :class:`GuestUnreadableError` after :data:`MAX_UNREADABLE` unreadable stops in a row.
        """
        stats = self.stats
        stats["trapped"] += 1
        view = self.view
        # The page-table root as the kernel keeps it (mm->pgd): the same value with PTI off and on.
        cr3 = view.space(cr3 & CR3_MASK).cr3
        try:
            if task is None:
                task = view.current_task(gs_base)
            elif not task:
                raise GuestMemoryError("the task could not be read at the call")
            ident = self._identity(task, cr3, who)
            self._unreadable = 0
        except GuestMemoryError:
            stats["unreadable"] += 1
            self._unreadable += 1
            if self._unreadable >= MAX_UNREADABLE:
                raise GuestUnreadableError(
                    f"{self._unreadable} stops in a row whose task could not be read (the guest is "
                    "rebooting, or the profile does not fit its kernel)") from None
            return False
        callsites = self.callsites
        if nr in EXECVE_CALLS or nr in EXIT_CALLS:
            # The next event of this task shows its new program, or it is a new task.
            self._identities.pop(task, None)
            if callsites is not None:
                callsites.invalidate(ident.mm)
        elif nr == PRCTL and args[0] == PR_SET_NAME:
            self._identities.pop(task, None)
        elif callsites is not None and nr in REMAP_CALLS:
            callsites.invalidate(ident.mm)
        pid, tgid, comm = who if who is not None else (ident.pid, ident.tgid, ident.comm)
        if not self.sampler.admit(comm, time.monotonic_ns(), nr):
            return False
        path = path_text
        arg = self.path_args.get(nr)
        if arg is not None and path is None:
            try:
                path = view.read_user_string(cr3, args[arg], 4096)
            except GuestMemoryError:
                stats["path_unreadable"] += 1
        rows = self.rows
        if nr in EXECVE_CALLS:
            rows.argv.append(_text(argv_text if argv_text is not None
                                   else read_argv(view, cr3, args[1] if nr == EXECVE else args[2])))
        else:
            rows.argv.append(None)
        rows.ppid.append(ident.ppid if ppid is None else ppid)
        rows.seq.append(self._seq)
        self._seq += 1
        rows.ts.append(ts_ns)
        rows.vcpu.append(vcpu)
        rows.pid.append(pid)
        rows.tgid.append(tgid)
        rows.comm.append(comm)
        rows.cr3.append(cr3)
        rows.nr.append(nr if nr < 1 << 31 else -1)
        rows.args.append(args)
        rows.ip.append(ip)
        rows.path.append(_text(path))
        rows.site.append(callsites.token(ident.mm, ip, user_sp, cr3) if callsites is not None else None)
        stats["events"] += 1
        return True

    def due(self, now_ns: int) -> None:
        """Hand the rows over as a batch if there are enough of them or they waited long enough."""
        if now_ns - self.last_batch >= self.batch_ns or len(self.rows) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        """Hand the rows gathered so far over as one batch.

        With no rows, an empty batch is handed over at most every :data:`HEARTBEAT_NS`: the tracer's
        heartbeat, so that a receiver tells an idle guest (empty batches keep coming) from a collector
        that stopped (nothing comes), and never reads an idle guest as a dead collector.
        """
        now = time.monotonic_ns()
        self.last_batch = now
        if not len(self.rows):
            if self.on_batch is not None and now - self._last_handed >= HEARTBEAT_NS:
                self._last_handed = now
                self.stats["heartbeats"] += 1
                self.on_batch(self.rows.batch(self.vm_id))
            return
        self._last_handed = now
        batch = self.rows.batch(self.vm_id)
        self.rows.clear()
        self.stats["batches"] += 1
        if self.keep:
            self.batches.append(batch)
        if self.on_batch is not None:
            self.on_batch(batch)

    def progress(self, now_ns: int | None = None) -> dict[str, Any]:
        """Counts and rates so far."""
        s = self.stats
        secs = max(((now_ns or time.monotonic_ns()) - self.start_ns) / 1e9, 1e-9)
        return {"events": s["events"], "trapped": s["trapped"], "seconds": round(secs, 3),
                "events_per_s": round(s["events"] / secs, 1), "trapped_per_s": round(s["trapped"] / secs, 1)}

    def result(self, reason: str, method: str, armed_ns: int) -> TraceResult:
        """The trace so far as a :class:`TraceResult` (after a last :meth:`flush`)."""
        self.flush()
        now = time.monotonic_ns()
        stats = self.stats
        stats["filtered"] = self.sampler.filtered
        stats["capped"] = self.sampler.capped
        stats.update(self.progress(now), armed_fraction=round(armed_ns / max(1, now - self.start_ns), 4))
        if self.callsites is not None:
            sites = self.callsites
            stats.update(site_fallbacks=sites.fallbacks, callers_sought=sites.callers_sought,
                         callers_found=sites.callers_found)
        events = (pa.Table.from_batches(self.batches, schema=EVENT_SCHEMA) if self.batches
                  else EVENT_SCHEMA.empty_table())
        return TraceResult(events, reason, method, dict(stats))

    def syscall_name(self, nr: int) -> str:
        """The name of call ``nr`` in the guest's table (``nr`` itself as text if unknown)."""
        return self.names.get(nr, str(nr))


class RecordingTracer:
    """The part every tracer built on an :class:`EventRecorder` shares (the GDB stub's, the QEMU
    plugin's, LibVMI's): a policy that may change while it traces, and the call names.

    A subclass sets :attr:`recorder`, :attr:`policy` and :attr:`notes` in its ``__init__`` and calls
    :meth:`_apply_new_policy` in its loop, where it is safe to switch (between two trapped calls);
    :meth:`_policy_switched` is where it applies what only it can (the plugin's cap in its control area).
    """

    recorder: EventRecorder
    policy: Policy
    #: Notes for the user.
    notes: list[str]
    _new_policy: Policy | None = None

    def set_policy(self, policy: Policy) -> None:
        """Trace by ``policy`` from now on (safe from another thread; applied at the loop's next turn).

        REM-S may change the tracing policy at any time; the running trace takes it at its next look-up,
        keeping what it counted so far.
        """
        self._new_policy = policy

    def _apply_new_policy(self, now: int) -> None:
        """Switch to the policy given to :meth:`set_policy` since the last call, if any (``now``: monotonic ns)."""
        policy, self._new_policy = self._new_policy, None
        if policy is None:
            return
        self.policy = policy
        self.recorder.switch_policy(policy, now)
        self._policy_switched()
        self.notes.append(f"policy changed while tracing: {policy.to_dict()}")

    def _policy_switched(self) -> None:
        """What the tracer itself does when :attr:`policy` changed (the recorder has switched already)."""

    def syscall_name(self, nr: int) -> str:
        """The name of call ``nr`` in the guest's table (``nr`` itself as text if unknown)."""
        return self.recorder.syscall_name(nr)
