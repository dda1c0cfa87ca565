"""System-call tracing of a QEMU guest from outside, through its GDB stub.

How a system call is trapped (DESIGN.md, measured on QEMU 7.2 under TCG):

- **watchpoint** (default): ``entry_SYSCALL_64`` saves the user stack pointer in a per-cpu scratch
  slot (``mov %rsp, %gs:cpu_tss_rw+0x14``, i.e. ``x86_tss.sp2``) on every system call. A write
  watchpoint on that slot stops the vCPU right after the store, with RAX = the call number,
  RCX = the user return address, RDI, RSI, RDX, R10, R8, R9 = the arguments and GS base = the
  kernel's per-cpu area. Nothing has to be stepped over: ~450-950 stops/s.
- **breakpoint** (fallback): an execution breakpoint at ``entry_SYSCALL_64_after_hwframe`` (same
  registers), stepped over at each hit; two translation-cache flushes per hit, ~35 stops/s.

At start-up :func:`check_entry` decodes the first instructions of ``entry_SYSCALL_64`` in guest
memory and uses the watchpoint only if that store is there, saying why if not.

For each stop the tracer reads the registers (one ``g`` packet), then everything else from the
mapped guest memory through :class:`~vims.collector.kernel.KernelView`: the current task (per-cpu
``current_task``), its identity (cached per task, re-read after ``execve``, ``exit``,
``prctl(PR_SET_NAME)`` and when CR3 changes), the path argument of calls that take one, and the call site token
(:mod:`vims.collector.callsite`). Rows are gathered into Arrow record batches of
:data:`EVENT_SCHEMA` (``vims.schemas.EVENT_SCHEMA`` plus the call site), handed to
``on_batch`` (e.g. :class:`vims.collector.stream.BatchSender.send`) every ``batch_rows`` events or
``batch_ms`` milliseconds.

Sampling follows a :class:`~vims.collector.policy.Policy`: outside the duty-cycle window, and once
the per-second cap is reached, the trap is removed so the guest runs at full speed.

Endings: the duration elapses, ``stop`` is set (Ctrl-C), ``max_events`` is reached, or the guest
goes away, is paused by someone else or becomes unreadable (a reboot). In every case the trace ends
with what was captured and :attr:`TraceResult.reason`; if the guest is still there, the trap is
removed and the guest left running.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vims.collector.callsite import REMAP_CALLS, CallSites
from vims.collector.gdbstub import GdbError, GdbStub, GuestGoneError, StopEvent
from vims.collector.memory import GuestMemoryError
from vims.collector.policy import Policy, Sampler
from vims.errors import VimsError
from vims.schemas import EVENT_SCHEMA

#: The longest command line kept in the ``argv`` column.
ARGV_LIMIT = 512

#: System calls that take a path, by name, and which argument holds it (x86-64; the numbers come
#: from the guest's own ``sys_call_table`` when it can be read, else from :data:`X86_64_NUMBERS`).
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

#: x86-64 numbers of the calls in :data:`PATH_ARGS` (the fixed ABI; used when the table is unreadable).
X86_64_NUMBERS: dict[str, int] = {
    "open": 2, "stat": 4, "lstat": 6, "access": 21, "execve": 59, "truncate": 76, "chdir": 80,
    "rename": 82, "mkdir": 83, "rmdir": 84, "creat": 85, "link": 86, "unlink": 87, "symlink": 88,
    "readlink": 89, "chmod": 90, "chown": 92, "lchown": 94, "utime": 132, "mknod": 133, "uselib": 134,
    "statfs": 137, "pivot_root": 155, "chroot": 161, "acct": 163, "mount": 165, "umount2": 166,
    "swapon": 167, "swapoff": 168, "setxattr": 188, "lsetxattr": 189, "getxattr": 191, "lgetxattr": 192,
    "listxattr": 194, "llistxattr": 195, "removexattr": 197, "lremovexattr": 198, "utimes": 235,
    "inotify_add_watch": 254, "openat": 257, "mkdirat": 258, "mknodat": 259, "fchownat": 260,
    "futimesat": 261, "newfstatat": 262, "unlinkat": 263, "renameat": 264, "linkat": 265,
    "symlinkat": 266, "readlinkat": 267, "fchmodat": 268, "faccessat": 269, "utimensat": 280,
    "renameat2": 316, "execveat": 322, "statx": 332, "openat2": 437, "faccessat2": 439,
    "read": 0, "write": 1, "close": 3, "mmap": 9, "exit": 60, "exit_group": 231,
}

EXECVE_CALLS = frozenset({59, 322})
#: prctl(PR_SET_NAME, ...) renames the task (busybox does it after re-running itself as an applet).
PRCTL, PR_SET_NAME = 157, 15
EXIT_CALLS = frozenset({60, 231})
#: Bits of CR3 that hold the page-table root (the rest: PCID, no-flush).
CR3_MASK = 0x000F_FFFF_FFFF_F000
#: Registers read at each stop, in the order the row needs them.
_REGS = ("rax", "rdi", "rsi", "rdx", "r10", "r8", "r9", "rcx", "gs_base", "cr3", "rip")
#: Consecutive stops whose task cannot be read before the trace ends (the guest is rebooting).
MAX_UNREADABLE = 50
_U64 = struct.Struct("<Q")


class TracerError(VimsError):
    """The tracer cannot trap system calls in this guest."""


# -- what the guest's kernel tells us --------------------------------------------------------------


def syscall_table(view: Any, profile: Any) -> dict[int, str]:
    """``{nr: name}`` from the guest's own ``sys_call_table``, each entry named through the profile.

    Entries pointing at ``sys_ni_syscall`` (unimplemented) are left out. Empty if the table cannot
    be read.
    """
    if not profile.has_symbol("sys_call_table"):
        return {}
    table = profile.symbol("sys_call_table")
    # The table ends where the next symbol starts (at most 1024 entries).
    following = [a for _, a in profile.symbols_between(table + 1, table + 8 * 1024)]
    count = min(1024, ((following[0] - table) // 8) if following else 512)
    try:
        raw = view.read(table, 8 * count)
    except GuestMemoryError:
        return {}
    names: dict[int, str] = {}
    for nr in range(count):
        (ptr,) = _U64.unpack_from(raw, 8 * nr)
        try:
            name, off = profile.symbol_at(ptr)
        except VimsError:
            continue
        if off != 0:
            continue
        for prefix in ("__x64_sys_", "__do_sys_", "sys_"):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name != "ni_syscall":
            names[nr] = name
    return names


@dataclass(frozen=True)
class EntryCheck:
    """What :func:`check_entry` found in ``entry_SYSCALL_64``."""

    method: str  # "watchpoint" or "breakpoint"
    slot: int  # per-cpu offset of the scratch slot (watchpoint)
    breakpoint: int  # address of the execution breakpoint (fallback)
    detail: str


def find_sp2_store(code: bytes, slot: int) -> int | None:
    """Offset in ``code`` of ``mov %rsp, %gs:<slot>`` (``65 48 89 24 25 <disp32>``), or None.

    >>> find_sp2_store(bytes.fromhex("0f01f8 6548892425 14600000 eb12"), 0x6014)
    3
    >>> find_sp2_store(bytes.fromhex("0f01f8 6548892425 18600000"), 0x6014) is None
    True
    """
    pattern = bytes.fromhex("6548892425") + struct.pack("<i", slot)
    pos = code.find(pattern)
    return None if pos < 0 else pos


def check_entry(view: Any, profile: Any) -> EntryCheck:
    """Decide how to trap system calls: the watchpoint if ``entry_SYSCALL_64`` stores the user RSP in
    ``cpu_tss_rw.x86_tss.sp2``, else an execution breakpoint."""
    entry = profile.symbol("entry_SYSCALL_64")
    after = (profile.symbol("entry_SYSCALL_64_after_hwframe")
             if profile.has_symbol("entry_SYSCALL_64_after_hwframe") else 0)
    try:
        sp2 = profile.offset("tss_struct", "x86_tss.sp2")
    except VimsError:
        sp2 = 0x14  # struct x86_hw_tss is packed: u32 reserved1, u64 sp0, sp1, sp2
    slot = profile.symbol("cpu_tss_rw") + sp2 if profile.has_symbol("cpu_tss_rw") else -1
    code = view.read(entry, 64)
    pos = find_sp2_store(code, slot) if slot >= 0 else None
    if pos is not None:
        return EntryCheck("watchpoint", slot, after,
                          f"entry_SYSCALL_64+{pos:#x} stores RSP in %gs:{slot:#x} (cpu_tss_rw.x86_tss.sp2)")
    if not after:
        raise TracerError("entry_SYSCALL_64 does not store RSP in cpu_tss_rw.x86_tss.sp2 and the profile has "
                          "no entry_SYSCALL_64_after_hwframe to break on: cannot trap system calls")
    return EntryCheck("breakpoint", slot, after,
                      f"entry_SYSCALL_64 does not store RSP in %gs:{slot:#x} (first bytes {code[:16].hex()}): "
                      "falling back to an execution breakpoint at entry_SYSCALL_64_after_hwframe (slow)")


# -- the trace -------------------------------------------------------------------------------------


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
        See :class:`SyscallTracer`.
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
        self.names = syscall_table(view, view.profile)
        if not self.names:
            self.notes.append("sys_call_table unreadable: syscall numbers from the x86-64 ABI")
        by_name = {name: nr for nr, name in self.names.items()} or X86_64_NUMBERS
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
                                      "batches": 0}
        self._identities: dict[int, _Identity] = {}
        self._seq = 0
        self._unreadable = 0

    def restart_clock(self) -> None:
        """Start the policy's clock (and the rate) now."""
        self.start_ns = self.last_batch = time.monotonic_ns()
        self.sampler = Sampler(self.policy, self.start_ns)

    def _identity(self, task: int, cr3: int) -> _Identity:
        ident = self._identities.get(task)
        if ident is None or ident.cr3 != cr3:
            t = self.view.task(task)
            self.stats["identity_reads"] += 1
            ident = _Identity(t.pid, t.tgid, t.ppid, t.comm, t.mm, cr3)
            if len(self._identities) > 65536:
                self._identities.clear()
            self._identities[task] = ident
        return ident

    def record(self, vcpu: int, nr: int, args: tuple[int, ...], ip: int, gs_base: int, cr3: int,
               ts_ns: int) -> bool:
        """Turn one trapped call into a row; ``False`` if it was not kept (filter, cap, unreadable task).

        Raises :class:`GuestUnreadableError` after :data:`MAX_UNREADABLE` unreadable stops in a row.
        """
        stats = self.stats
        stats["trapped"] += 1
        cr3 &= CR3_MASK
        view = self.view
        try:
            task = view.current_task(gs_base)
            ident = self._identity(task, cr3)
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
        if not self.sampler.admit(ident.comm, time.monotonic_ns()):
            return False
        path = None
        arg = self.path_args.get(nr)
        if arg is not None:
            try:
                path = view.read_user_string(cr3, args[arg], 4096)
            except GuestMemoryError:
                stats["path_unreadable"] += 1
        rows = self.rows
        rows.argv.append(read_argv(view, cr3, args[1] if nr == 59 else args[2])
                         if nr in EXECVE_CALLS else None)
        rows.ppid.append(ident.ppid)
        rows.seq.append(self._seq)
        self._seq += 1
        rows.ts.append(ts_ns)
        rows.vcpu.append(vcpu)
        rows.pid.append(ident.pid)
        rows.tgid.append(ident.tgid)
        rows.comm.append(ident.comm)
        rows.cr3.append(cr3)
        rows.nr.append(nr if nr < 1 << 31 else -1)
        rows.args.append(args)
        rows.ip.append(ip)
        rows.path.append(path)
        rows.site.append(callsites.token(ident.mm, ip) if callsites is not None else None)
        stats["events"] += 1
        return True

    def due(self, now_ns: int) -> None:
        """Hand the rows over as a batch if there are enough of them or they waited long enough."""
        if now_ns - self.last_batch >= self.batch_ns or len(self.rows) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        """Hand the rows gathered so far over as one batch."""
        self.last_batch = time.monotonic_ns()
        if not len(self.rows):
            return
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
        events = (pa.Table.from_batches(self.batches, schema=EVENT_SCHEMA) if self.batches
                  else EVENT_SCHEMA.empty_table())
        return TraceResult(events, reason, method, dict(stats))

    def syscall_name(self, nr: int) -> str:
        """The name of call ``nr`` in the guest's table (``nr`` itself as text if unknown)."""
        return self.names.get(nr, str(nr))


class SyscallTracer:
    """Trap the guest's system calls through its GDB stub and turn them into event rows.

    Parameters
    ----------
    gdb : GdbStub
        A connection to the guest's stub (the tracer halts and resumes it; the caller closes it).
    view : KernelView
        The guest's kernel seen through its mapped memory.
    vm_id : str
        Written in every row (and the stream's sender id, by convention).
    policy : Policy, optional
        Sampling; default: trace everything.
    method : {"auto", "watchpoint", "breakpoint"}
        ``auto`` checks the entry code (:func:`check_entry`) and takes the watchpoint when it can.
    callsites : bool
        Fill the ``site`` column (:class:`~vims.collector.callsite.CallSites`).
    batch_rows, batch_ms : int
        A batch is handed to ``on_batch`` after this many rows or this long, whichever comes first.
    on_batch : callable, optional
        Receives each :class:`pyarrow.RecordBatch`; it must not block (a stream sender's ``send``).
    keep : bool
        Keep every batch for :attr:`TraceResult.events` (turn off for endless streaming).
    """

    def __init__(self, gdb: GdbStub, view: Any, vm_id: str, policy: Policy | None = None,
                 method: str = "auto", callsites: bool = True, batch_rows: int = 2048, batch_ms: int = 250,
                 on_batch: Callable[[pa.RecordBatch], Any] | None = None, keep: bool = True) -> None:
        if method not in ("auto", "watchpoint", "breakpoint"):
            raise VimsError(f"method {method!r}: one of auto, watchpoint, breakpoint")
        self.gdb = gdb
        self.view = view
        self.policy = policy or Policy()
        self.entry = check_entry(view, view.profile)
        if method == "watchpoint" and self.entry.method != "watchpoint":
            raise TracerError(self.entry.detail)
        self.method = self.entry.method if method == "auto" else method
        if method == "breakpoint" and self.entry.method == "watchpoint":
            self.entry = EntryCheck("breakpoint", self.entry.slot, self.entry.breakpoint,
                                    "execution breakpoint at entry_SYSCALL_64_after_hwframe, as asked (slow)")
        self.recorder = EventRecorder(view, vm_id, self.policy, callsites, batch_rows, batch_ms, on_batch, keep)
        self._new_policy: Policy | None = None
        #: Notes for the user: the method chosen and why, fallbacks taken.
        self.notes: list[str] = [self.entry.detail, *self.recorder.notes]
        self.names = self.recorder.names
        self.stats = self.recorder.stats
        self._traps: list[tuple[str, int, int]] = []
        self._vcpus: list[int] = [0]

    def set_policy(self, policy: Policy) -> None:
        """Trace by ``policy`` from now on (safe from another thread; applied within 0.2 s).

        REM-S may change the tracing policy at any time; the running trace takes it at its next look-up,
        keeping what it counted so far.
        """
        self._new_policy = policy

    def _apply_new_policy(self, now: int) -> Sampler:
        policy, self._new_policy = self._new_policy, None
        assert policy is not None
        rec = self.recorder
        old = rec.sampler
        rec.policy = self.policy = policy
        rec.sampler = Sampler(policy, now)
        rec.sampler.filtered, rec.sampler.capped = old.filtered, old.capped
        self.notes.append(f"policy changed while tracing: {policy.to_dict()}")
        return rec.sampler

    # -- registers -------------------------------------------------------------------------------
    def _registers(self, vcpu: int | None) -> dict[str, int]:
        """The registers a row needs, decoded alone from the stop's ``g`` packet."""
        return self.gdb.registers(vcpu, names=_REGS)

    # -- traps -----------------------------------------------------------------------------------
    def _trap_list(self) -> list[tuple[str, int, int]]:
        if self.method == "watchpoint":
            return [("write", self.view.per_cpu_base(cpu) + self.entry.slot, 8) for cpu in self._vcpus]
        return [("hw", self.entry.breakpoint, 1)]

    def _arm(self) -> None:
        for trap in self._trap_list():
            self.gdb.set_breakpoint(*trap)
            self._traps.append(trap)

    def _disarm(self) -> None:
        while self._traps:
            kind, addr, size = self._traps.pop()
            self.gdb.clear_breakpoint(kind, addr, size)

    def _step_over(self, vcpu: int | None) -> StopEvent | None:
        """Execute the instruction under the breakpoint with the breakpoint removed, then put it back."""
        gdb = self.gdb
        self._disarm()
        event = gdb.step(vcpu)
        self._arm()
        return event

    # -- the loop --------------------------------------------------------------------------------
    def run(self, duration: float | None = None, stop: threading.Event | None = None,
            max_events: int | None = None, progress: Callable[[dict[str, Any]], Any] | None = None,
            progress_s: float = 0.5) -> TraceResult:
        """Trace until ``duration`` seconds pass, ``stop`` is set or ``max_events`` are kept.

        Returns what was captured and why it ended; the guest is left running without traps unless
        it went away.
        """
        gdb = self.gdb
        rec = self.recorder
        stop = stop or threading.Event()
        stats = rec.stats
        reason = "duration"
        gone = False
        armed = False
        armed_ns = 0
        armed_since = 0
        try:
            gdb.halt()
            self._vcpus = gdb.vcpus() or [0]
            rec.restart_clock()
            sampler = rec.sampler
            start_ns = rec.start_ns
            end_ns = None if duration is None else start_ns + int(duration * 1e9)
            last_progress = start_ns
            while True:
                # Here the VM is always stopped.
                now = time.monotonic_ns()
                if stop.is_set():
                    reason = "interrupted"
                    break
                if end_ns is not None and now >= end_ns:
                    reason = "duration"
                    break
                if max_events is not None and stats["events"] >= max_events:
                    reason = "max-events"
                    break
                if self._new_policy is not None:
                    sampler = self._apply_new_policy(now)
                rec.due(now)
                if progress is not None and now - last_progress >= progress_s * 1e9:
                    last_progress = now
                    progress(rec.progress(now))
                want = sampler.armed(now)
                if want != armed:
                    if want:
                        self._arm()
                        armed_since = now
                    else:
                        self._disarm()
                        armed_ns += now - armed_since
                    armed = want
                # Wait for a stop, but look up at least every 0.2 s (Ctrl-C, duration, duty cycle).
                horizon = now + 200_000_000
                for t in (end_ns, sampler.next_change(now)):
                    if t is not None:
                        horizon = min(horizon, t)
                gdb.resume()
                event = gdb.wait(max(0.0, (horizon - time.monotonic_ns()) / 1e9))
                if event is None:
                    event = gdb.halt()
                    if event.signal == 2 and event.reason == "signal":
                        continue  # our own interrupt
                if event.reason not in ("watch", "awatch", "swbreak", "hwbreak") and event.signal != 5:
                    # Not ours: the VM was paused (monitor "stop" gives SIGINT) or is shutting down.
                    reason = f"guest-stopped: the VM stopped by itself or by someone else (signal {event.signal})"
                    break
                if self.method == "watchpoint" and event.reason != "watch":
                    continue
                regs = self._registers(event.vcpu)
                if self.method == "breakpoint":
                    if regs["rip"] != self.entry.breakpoint:
                        continue
                    self._step_over(event.vcpu)
                rec.record(event.vcpu or 0, regs["rax"],
                           (regs["rdi"], regs["rsi"], regs["rdx"], regs["r10"], regs["r8"], regs["r9"]),
                           regs["rcx"], regs["gs_base"], regs["cr3"], time.time_ns())
        except GuestGoneError as exc:
            gone = True
            reason = f"guest-gone: {exc}"
        except GuestUnreadableError as exc:
            reason = f"guest-unreadable: {exc}"
        except GdbError as exc:
            # An interrupt that goes unanswered (still running) means QEMU itself is stopped or frozen.
            reason = (f"guest-unresponsive: {exc} (is the QEMU process stopped?)" if gdb.running
                      else f"gdb-error: {exc}")
        finally:
            if armed:
                armed_ns += time.monotonic_ns() - armed_since
            if not gone:
                try:
                    # A VM someone else paused stays paused (QEMU resumes it when we detach, though).
                    self._cleanup(resume=not reason.startswith("guest-stopped"))
                except GuestGoneError as exc:
                    reason = reason if reason.startswith("guest-gone") else f"guest-gone: {exc}"
                except GdbError as exc:
                    self.notes.append(f"could not remove the trap yet ({exc}): closing the GDB connection "
                                      "removes it (GdbStub.close, or QEMU when the client goes)")
        return rec.result(reason, self.method, armed_ns)

    def _cleanup(self, resume: bool = True) -> None:
        """Remove every trap and leave the guest running."""
        gdb = self.gdb
        if gdb.running:
            gdb.halt()
        self._disarm()
        for kind, addr, size in gdb.breakpoints():
            gdb.clear_breakpoint(kind, addr, size)
        if resume:
            gdb.resume()

    def syscall_name(self, nr: int) -> str:
        """The name of call ``nr`` in the guest's table (``nr`` itself as text if unknown)."""
        return self.recorder.syscall_name(nr)
