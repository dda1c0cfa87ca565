"""System-call tracing of a QEMU guest from outside, through its GDB stub.

How a system call is trapped (measured on QEMU 7.2 under TCG; the numbers are the README's, from
``python benchmarks/bench_tracing.py`` on a guest busy making system calls):

- **watchpoint** (default): ``entry_SYSCALL_64`` saves the user stack pointer in a per-cpu scratch
  slot (``mov %rsp, %gs:cpu_tss_rw+0x14``, i.e. ``x86_tss.sp2``) on every system call. A write
  watchpoint on that slot stops the vCPU right after the store, with RAX = the call number,
  RCX = the user return address, RDI, RSI, RDX, R10, R8, R9 = the arguments and GS base = the
  kernel's per-cpu area. Nothing has to be stepped over: about 2,350-2,700 events/s.
- **breakpoint** (fallback): an execution breakpoint at ``entry_SYSCALL_64_after_hwframe`` (same
  registers), stepped over at each hit; two translation-cache flushes per hit, about 100 events/s.

At start-up :func:`check_entry` decodes the first instructions of ``entry_SYSCALL_64`` in guest
memory and uses the watchpoint only if that store is there, saying why if not.

For each stop the tracer reads the registers (one ``g`` packet); the rest (task, identity, path,
``argv``, call site, filter, cap, batches) is the backend-neutral
:class:`~vims.collector.recorder.EventRecorder`, which the LibVMI tracer uses too.

**Several vCPUs** (the Debian guest has 2): each CPU has its own slot (``__per_cpu_offset[cpu] +
cpu_tss_rw + 0x14``); one write watchpoint per slot, and QEMU sets each on every vCPU. A stop names
the vCPU that trapped; its registers (GS base: its task; CR3: its address space, PCID and PTI's
user-copy bit masked) make the row, with ``vcpu`` = that vCPU. Under MTTCG a vCPU that traps while
the VM is being stopped for another one's trap is left stopped right after the store, unreported:
at every stop the tracer looks at the other vCPUs' RIP and records such a call too
(:meth:`SyscallTracer._catch_up`; ``stats["recovered"]``, about 3% of the calls on the Debian guest).
A row whose GS base is not its vCPU's per-cpu base is counted in ``stats["vcpu_mismatch"]``.
With PTI on, the store runs on the user copy of the page tables, which map the per-cpu TSS page
(PTI clones it for exactly this store), so the watchpoint fires as with PTI off.

Sampling follows a :class:`~vims.tracing_policy.Policy`: outside the duty-cycle window, and once
the per-second cap is reached, the trap is removed so the guest runs at full speed.

Endings: the duration elapses, ``stop`` is set (Ctrl-C), ``max_events`` is reached, or the guest
goes away, is paused by someone else or becomes unreadable (a reboot). In every case the trace ends
with what was captured and :attr:`TraceResult.reason`; if the guest is still there, the trap is
removed and the guest left running.

Use::

    with QemuBackend.from_guest("vims-guest") as backend:
        result = SyscallTracer(backend, "vm-1").run(duration=10)
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from vims.collector.backends.qemu import QemuBackend
from vims.collector.gdbstub import GdbError, GdbStub, GuestGoneError, StopEvent
from vims.collector.recorder import EventRecorder, GuestUnreadableError, RecordingTracer, TraceResult
from vims.errors import VimsError
from vims.tracing_policy import Policy

__all__ = ["EntryCheck", "SyscallTracer", "TraceResult", "TracerError", "check_entry", "find_sp2_store"]

#: Registers read at each stop, in the order the row needs them (RSP: the user stack at a watchpoint stop).
_REGS = ("rax", "rdi", "rsi", "rdx", "r10", "r8", "r9", "rcx", "gs_base", "cr3", "rip", "rsp")
#: Length of ``mov %rsp, %gs:disp32`` (``65 48 89 24 25`` + 4 bytes).
_STORE_LEN = 9
#: Stop reasons of our traps.
_TRAP_REASONS = ("watch", "awatch", "swbreak", "hwbreak")
#: The longest wait for a stop before the loop looks up (Ctrl-C, duration, duty cycle).
_LOOKUP_NS = 200_000_000


class TracerError(VimsError):
    """The tracer cannot trap system calls in this guest."""


# -- what the guest's entry code allows ------------------------------------------------------------


@dataclass(frozen=True)
class EntryCheck:
    """What :func:`check_entry` found in ``entry_SYSCALL_64``."""

    method: str  # "watchpoint" or "breakpoint"
    slot: int  # per-cpu offset of the scratch slot (watchpoint)
    breakpoint: int  # address of the execution breakpoint (fallback)
    detail: str
    after_store: int = 0  # address of the instruction after the store: where a watchpoint stop leaves a vCPU


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
                          f"entry_SYSCALL_64+{pos:#x} stores RSP in %gs:{slot:#x} (cpu_tss_rw.x86_tss.sp2)",
                          entry + pos + _STORE_LEN)
    if not after:
        raise TracerError("entry_SYSCALL_64 does not store RSP in cpu_tss_rw.x86_tss.sp2 and the profile has "
                          "no entry_SYSCALL_64_after_hwframe to break on: cannot trap system calls")
    return EntryCheck("breakpoint", slot, after,
                      f"entry_SYSCALL_64 does not store RSP in %gs:{slot:#x} (first bytes {code[:16].hex()}): "
                      "falling back to an execution breakpoint at entry_SYSCALL_64_after_hwframe (slow)")


# -- the trace -------------------------------------------------------------------------------------


@dataclass
class _Run:
    """The state of one :meth:`SyscallTracer.run`: its limits, the trap's state and how it ended."""

    stop: threading.Event
    max_events: int | None
    progress: Callable[[dict[str, Any]], Any] | None
    progress_ns: int
    end_ns: int | None = None
    last_progress: int = 0
    armed: bool = False
    armed_ns: int = 0
    armed_since: int = 0
    reason: str = "duration"
    gone: bool = False


class SyscallTracer(RecordingTracer):
    """Trap the guest's system calls through its GDB stub and turn them into event rows.

    Parameters
    ----------
    backend : QemuBackend
        The guest (:meth:`QemuBackend.from_guest`); the tracer halts and resumes its
        :attr:`~QemuBackend.gdb` stub and reads through its :attr:`~QemuBackend.kernel` (the
        caller closes the backend).
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

    def __init__(self, backend: QemuBackend, vm_id: str, *, policy: Policy | None = None, method: str = "auto",
                 callsites: bool = True,
                 batch_rows: int = 2048, batch_ms: int = 250,
                 on_batch: Callable[[pa.RecordBatch], Any] | None = None, keep: bool = True) -> None:
        if not isinstance(vm_id, str):
            raise VimsError("SyscallTracer(backend, vm_id): the vm id is text")
        if method not in ("auto", "watchpoint", "breakpoint"):
            raise VimsError(f"method {method!r}: one of auto, watchpoint, breakpoint")
        self.backend = backend
        self.view = view = backend.kernel
        self.policy = policy or Policy()
        self.entry = check_entry(view, view.profile)
        if method == "watchpoint" and self.entry.method != "watchpoint":
            raise TracerError(self.entry.detail)
        self.method = self.entry.method if method == "auto" else method
        if method == "breakpoint" and self.entry.method == "watchpoint":
            self.entry = EntryCheck("breakpoint", self.entry.slot, self.entry.breakpoint,
                                    "execution breakpoint at entry_SYSCALL_64_after_hwframe, as asked (slow)")
        self.recorder = EventRecorder(view, vm_id, self.policy, callsites, batch_rows, batch_ms, on_batch, keep)
        #: Notes for the user: the method chosen and why, fallbacks taken.
        self.notes: list[str] = [self.entry.detail, *self.recorder.notes]
        self.names = self.recorder.names
        self.stats = self.recorder.stats
        self.stats["recovered"] = 0  # calls of vCPUs whose stop QEMU did not report (_catch_up)
        self.stats["vcpu_mismatch"] = 0  # stops whose GS base is not their vCPU's per-cpu base
        self._bases: dict[int, int] = {}
        self._traps: list[tuple[str, int, int]] = []
        self._vcpus: list[int] = [0]
        #: Per vCPU, the registers of its last call recorded by the watchpoint (see _catch_up).
        self._seen: dict[int, tuple[int, ...]] = {}

    @property
    def gdb(self) -> GdbStub:
        """The backend's GDB stub connection."""
        return self.backend.gdb

    # -- traps -----------------------------------------------------------------------------------
    def _trap_list(self) -> list[tuple[str, int, int]]:
        if self.method == "watchpoint":
            return [("write", self._bases[cpu] + self.entry.slot, 8) for cpu in self._vcpus]
        return [("hw", self.entry.breakpoint, 1)]

    def _arm(self) -> None:
        for trap in self._trap_list():
            self.gdb.set_breakpoint(*trap)
            self._traps.append(trap)

    def _disarm(self) -> None:
        while self._traps:
            kind, addr, size = self._traps.pop()
            self.gdb.clear_breakpoint(kind, addr, size)

    def _set_armed(self, run: _Run, want: bool, now: int) -> None:
        """Put the traps in or take them out (the duty cycle and the cap), counting the armed time."""
        if want == run.armed:
            return
        if want:
            self._arm()
            run.armed_since = now
        else:
            self._disarm()
            run.armed_ns += now - run.armed_since
        run.armed = want

    def _step_over(self, vcpu: int | None) -> StopEvent | None:
        """Execute the instruction under the breakpoint with the breakpoint removed, then put it back."""
        self._disarm()
        event = self.gdb.step(vcpu)
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
        run = _Run(stop or threading.Event(), max_events, progress, int(progress_s * 1e9))
        try:
            gdb.halt()
            self._vcpus = gdb.vcpus() or [0]
            self._bases = {cpu: self.view.per_cpu_base(cpu) for cpu in self._vcpus}
            self.recorder.restart_clock()
            run.last_progress = start_ns = self.recorder.start_ns
            run.end_ns = None if duration is None else start_ns + int(duration * 1e9)
            reason = None
            while reason is None:
                reason = self._once(run)
            run.reason = reason
        except GuestGoneError as exc:
            run.gone = True
            run.reason = f"guest-gone: {exc}"
        except GuestUnreadableError as exc:
            run.reason = f"guest-unreadable: {exc}"
        except GdbError as exc:
            # An interrupt that goes unanswered (still running) means QEMU itself is stopped or frozen.
            run.reason = (f"guest-unresponsive: {exc} (is the QEMU process stopped?)" if gdb.running
                          else f"gdb-error: {exc}")
        finally:
            self._finish(run)
        return self.recorder.result(run.reason, self.method, run.armed_ns)

    def _ending(self, run: _Run, now: int) -> str | None:
        """Why the trace ends now, or None."""
        if run.stop.is_set():
            return "interrupted"
        if run.end_ns is not None and now >= run.end_ns:
            return "duration"
        if run.max_events is not None and self.stats["events"] >= run.max_events:
            return "max-events"
        return None

    def _once(self, run: _Run) -> str | None:
        """One look-up and at most one stop (the VM is stopped before and after); why it ended, or None."""
        rec = self.recorder
        now = time.monotonic_ns()
        reason = self._ending(run, now)
        if reason is not None:
            return reason
        self._apply_new_policy(now)  # one REM-S gave meanwhile (set_policy; within 0.2 s)
        rec.due(now)
        if run.progress is not None and now - run.last_progress >= run.progress_ns:
            run.last_progress = now
            run.progress(rec.progress(now))
        self._set_armed(run, rec.sampler.armed(now), now)
        event = self._wait(run, now)
        if event is None:
            if run.armed and self.method == "watchpoint" and len(self._vcpus) > 1:
                self._catch_up(None, time.time_ns())  # our interrupt may have stopped a vCPU's trap
            return None
        if event.reason not in _TRAP_REASONS and event.signal != 5:
            # Not ours: the VM was paused (monitor "stop" gives SIGINT) or is shutting down.
            return f"guest-stopped: the VM stopped by itself or by someone else (signal {event.signal})"
        self._record(event)
        return None

    def _wait(self, run: _Run, now: int) -> StopEvent | None:
        """Let the guest run until a stop or the next look-up; the stop, or None for our own interrupt."""
        gdb = self.gdb
        horizon = now + _LOOKUP_NS
        for t in (run.end_ns, self.recorder.sampler.next_change(now)):
            if t is not None:
                horizon = min(horizon, t)
        gdb.resume()
        event = gdb.wait(max(0.0, (horizon - time.monotonic_ns()) / 1e9))
        if event is None:
            event = gdb.halt()
            if event.signal == 2 and event.reason == "signal":
                return None  # our own interrupt
        return event

    def _record(self, event: StopEvent) -> None:
        """Turn a stop at our trap into a row (stepping over the breakpoint first); with the
        watchpoint on several vCPUs, also the calls of the others that QEMU did not report."""
        ts_ns = time.time_ns()
        if self.method == "watchpoint" and event.reason != "watch":
            if len(self._vcpus) > 1:
                self._catch_up(None, ts_ns)
            return
        vcpu = event.vcpu or 0
        regs = self.gdb.registers(event.vcpu, names=_REGS)
        if self.method == "breakpoint":
            if regs["rip"] != self.entry.breakpoint:
                return
            self._step_over(event.vcpu)
            # past the entry's pushes RSP is the kernel stack; the user's is in the scratch slot
            user_sp = self.view.u64(regs["gs_base"] + self.entry.slot) if self.entry.slot >= 0 else 0
        else:
            user_sp = regs["rsp"]
            if len(self._vcpus) > 1:
                self._seen[vcpu] = tuple(regs.values())
                self._catch_up(vcpu, ts_ns)
        self._emit(vcpu, regs, user_sp, ts_ns)

    def _catch_up(self, reporter: int | None, ts_ns: int) -> None:
        """Record the calls of vCPUs left stopped right after the store whose stop QEMU did not report.

        A stop reply names one vCPU: the last to hit a trap before the VM stopped. Under MTTCG the
        other vCPUs run on until they are paused, and one that hits its own watchpoint meanwhile
        is left stopped after the store, its stop never reported (measured on the 2-vCPU Debian
        guest: about 3% of the calls). Such a vCPU sits at :attr:`EntryCheck.after_store`. One
        that is still there since an earlier stop (recorded then, not run since) has the same
        registers as then and is skipped; so is, therefore, a call repeated with every register
        equal between two stops (a loop of identical calls, caught at the same instruction twice).
        """
        gdb = self.gdb
        for vcpu in self._vcpus:
            if vcpu == reporter or gdb.register("rip", vcpu) != self.entry.after_store:
                continue
            regs = gdb.registers(vcpu, names=_REGS)
            seen = tuple(regs.values())
            if self._seen.get(vcpu) == seen:
                continue
            self._seen[vcpu] = seen
            self.stats["recovered"] += 1
            self._emit(vcpu, regs, regs["rsp"], ts_ns)

    def _emit(self, vcpu: int, regs: dict[str, int], user_sp: int, ts_ns: int) -> None:
        if regs["gs_base"] != self._bases.get(vcpu):
            # not __per_cpu_offset[vcpu]: registers read from another vCPU than the stop named (or the
            # guest numbers its CPUs otherwise); the row stays consistent, its vcpu may be wrong
            self.stats["vcpu_mismatch"] += 1
        self.recorder.record(vcpu, regs["rax"],
                             (regs["rdi"], regs["rsi"], regs["rdx"], regs["r10"], regs["r8"], regs["r9"]),
                             regs["rcx"], regs["gs_base"], regs["cr3"], ts_ns, user_sp)

    def _finish(self, run: _Run) -> None:
        """Count the last armed stretch, take the traps out and leave the guest running (if it is there)."""
        if run.armed:
            run.armed_ns += time.monotonic_ns() - run.armed_since
        if run.gone:
            return
        try:
            # A VM someone else paused stays paused (QEMU resumes it when we detach, though).
            self._cleanup(resume=not run.reason.startswith("guest-stopped"))
        except GuestGoneError as exc:
            run.reason = run.reason if run.reason.startswith("guest-gone") else f"guest-gone: {exc}"
        except GdbError as exc:
            self.notes.append(f"could not remove the trap yet ({exc}): closing the GDB connection "
                              "removes it (GdbStub.close, or QEMU when the client goes)")

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
