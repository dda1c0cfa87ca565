"""The system-call tracer on LibVMI (Xen, KVMi): an INT3 breakpoint and single-stepping.

As LibVMI's own breakpoint examples do: the byte at ``entry_SYSCALL_64_after_hwframe`` (where the
kernel runs on its own GS base with every syscall register still intact) is replaced by ``0xCC``;
an ``IntEvent`` (INT3) reports each hit with the vCPU's registers. The callback records the call
(the same :class:`~vims.collector.recorder.EventRecorder` as the GDB tracer: identity, path,
``argv``, call site, program filter, rate cap), tells LibVMI not to reinject the interrupt, puts
the original byte back and asks for one single step; the ``SingleStepEvent`` after it writes
``0xCC`` again. An INT3 elsewhere is the guest's own and is reinjected.

The duty cycle inserts and removes the breakpoint between ``listen`` calls. With several vCPUs, a
call that another vCPU makes while one is stepping (the byte restored) is missed, as in LibVMI's
examples; the count of steps is in the stats.

Use::

    with LibvmiBackend("my-domain", profile) as backend:
        result = LibvmiSyscallTracer(backend, "my-domain").run(duration=10)
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from vims.collector.backends.libvmi import LibvmiBackend
from vims.collector.recorder import EventRecorder, GuestUnreadableError, RecordingTracer, TraceResult
from vims.collector.tracer import TracerError
from vims.errors import VimsError
from vims.tracing_policy import Policy

INT3 = b"\xcc"


class LibvmiSyscallTracer(RecordingTracer):
    """Trap the guest's system calls through LibVMI events.

    Parameters
    ----------
    backend : LibvmiBackend
        The guest (:class:`vims.collector.backends.LibvmiBackend`, opened with events); the
        tracer reads through its :attr:`~LibvmiBackend.kernel` and traps through its
        :attr:`~LibvmiBackend.vmi`, as :class:`~vims.collector.tracer.SyscallTracer` does through a
        :class:`~vims.collector.backends.QemuBackend` (the caller closes it).
    vm_id : str
        Written in every row.
    policy, callsites, batch_rows, batch_ms, on_batch, keep
        As for :class:`vims.collector.tracer.SyscallTracer`.
    target : int, optional
        Where to break (default: ``entry_SYSCALL_64_after_hwframe`` from the profile).
    """

    method = "int3"

    def __init__(self, backend: LibvmiBackend, vm_id: str, *, policy: Policy | None = None, callsites: bool = True,
                 batch_rows: int = 2048, batch_ms: int = 250,
                 on_batch: Callable[[pa.RecordBatch], Any] | None = None, keep: bool = True,
                 target: int | None = None) -> None:
        self.backend = backend
        self.vmi = backend.vmi
        self._events_mod = importlib.import_module("libvmi.event")
        self._libvmi_error: type[Exception] = importlib.import_module("libvmi").LibvmiError
        view = backend.kernel
        profile = view.profile
        if target is None:
            if not profile.has_symbol("entry_SYSCALL_64_after_hwframe"):
                raise TracerError("the kernel profile has no entry_SYSCALL_64_after_hwframe to break on")
            target = int(profile.symbol("entry_SYSCALL_64_after_hwframe"))
        self.target = target
        self.policy = policy or Policy()
        self.recorder = EventRecorder(view, vm_id, self.policy, callsites, batch_rows, batch_ms, on_batch, keep)
        self.notes = [f"INT3 at {target:#x} with single-step (LibVMI)", *self.recorder.notes]
        self.stats = self.recorder.stats
        self.stats.update(steps=0, reinjected=0)
        self._original: bytes | None = None
        self._armed = False
        self._armed_ns = 0
        self._armed_since = 0
        self._events: list[Any] = []
        self._error: BaseException | None = None
        # At the INT3 the user RSP still sits in the per-cpu slot entry_SYSCALL_64 saved it to.
        self._sp2_slot = int(profile.symbol("cpu_tss_rw")) + 0x14 if profile.has_symbol("cpu_tss_rw") else None

    # -- the breakpoint --------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        self.vmi.write_va(self.target, 0, data)

    def _arm(self) -> None:
        if not self._armed:
            self._write(INT3)
            self._armed = True
            self._armed_since = time.monotonic_ns()

    def _disarm(self) -> None:
        if self._armed:
            assert self._original is not None
            self._write(self._original)
            self._armed = False
            self._armed_ns += time.monotonic_ns() - self._armed_since

    # -- callbacks (inside vmi.listen) -----------------------------------------------------------
    def _on_int3(self, vmi: Any, event: Any) -> Any:
        ev = self._events_mod
        cffi = event.cffi_event
        regs = cffi.x86_regs
        if regs.rip != self.target or self._original is None:
            event.reinject = 1  # the guest's own breakpoint
            self.stats["reinjected"] += 1
            return ev.EventResponse.NONE
        event.reinject = 0
        try:
            self.recorder.record(int(cffi.vcpu_id), int(regs.rax),
                                 (int(regs.rdi), int(regs.rsi), int(regs.rdx), int(regs.r10), int(regs.r8),
                                  int(regs.r9)),
                                 int(regs.rcx), int(regs.gs_base), int(regs.cr3), time.time_ns(),
                                 self._user_sp(int(regs.gs_base)))
        except (GuestUnreadableError, VimsError) as exc:
            self._error = exc  # raising inside LibVMI's C callback would be lost: end the loop instead
        # Run the real instruction: original byte back, one step, then the step callback re-arms.
        self._write(self._original)
        return ev.EventResponse.TOGGLE_SINGLESTEP

    def _user_sp(self, gs_base: int) -> int:
        """The user RSP ``entry_SYSCALL_64`` saved in this CPU's ``cpu_tss_rw.x86_tss.sp2`` (0 if unknown)."""
        if self._sp2_slot is None:
            return 0
        try:
            return int(self.recorder.view.u64(gs_base + self._sp2_slot))
        except (GuestUnreadableError, VimsError):
            return 0

    def _on_step(self, vmi: Any, event: Any) -> Any:
        self.stats["steps"] += 1
        if self._armed:
            self._write(INT3)
        return self._events_mod.EventResponse.TOGGLE_SINGLESTEP

    # -- the loop --------------------------------------------------------------------------------
    def start(self) -> None:
        """Register the events and start the policy's clock (:meth:`run` does it if not done)."""
        ev = self._events_mod
        data, count = self.vmi.read_va(self.target, 0, 1)
        if count != 1:
            raise TracerError(f"cannot read the kernel byte at {self.target:#x}")
        self._original = bytes(data[:1])
        if self._original == INT3:
            raise TracerError(f"there is already a breakpoint at {self.target:#x} (another tracer?)")
        self._events = [ev.IntEvent(self._on_int3)]
        self._events += [ev.SingleStepEvent([vcpu], self._on_step, enable=False)
                         for vcpu in range(int(self.vmi.get_num_vcpus()))]
        for event in self._events:
            self.vmi.register_event(event)
        self.recorder.restart_clock()

    def poll(self, timeout_ms: int = 100) -> None:
        """Arm or disarm as the policy says, deliver pending events (up to ``timeout_ms``), batch rows."""
        rec = self.recorder
        now = time.monotonic_ns()
        self._apply_new_policy(now)  # one REM-S gave meanwhile (set_policy)
        if rec.sampler.armed(now):
            self._arm()
        else:
            self._disarm()
        self.vmi.listen(timeout_ms)
        if self._error is not None:
            raise self._error
        # The cap may have been reached inside the callbacks: take the breakpoint out at once.
        if self._armed and not rec.sampler.armed(time.monotonic_ns()):
            self._disarm()
        rec.due(time.monotonic_ns())

    def finish(self, reason: str) -> TraceResult:
        """Remove the breakpoint and the events; the trace so far and ``reason``."""
        try:
            self._disarm()
            if self._original is not None:
                self._write(self._original)  # also when a step was under way
            self.vmi.listen(0)  # hits that happened before the byte went back are still recorded
            for event in self._events:
                self.vmi.clear_event(event)
        except (self._libvmi_error, VimsError) as exc:  # the guest may be gone
            self.notes.append(f"could not remove the breakpoint cleanly: {exc}")
        self._events = []
        return self.recorder.result(reason, self.method, self._armed_ns)

    def run(self, duration: float | None = None, stop: threading.Event | None = None,
            max_events: int | None = None, listen_ms: int = 100) -> TraceResult:
        """Trace until ``duration`` seconds pass, ``stop`` is set or ``max_events`` are kept."""
        stop = stop or threading.Event()
        if not self._events:
            self.start()
        end = None if duration is None else time.monotonic() + duration
        reason = "duration"
        try:
            while True:
                if stop.is_set():
                    reason = "interrupted"
                    break
                if end is not None and time.monotonic() >= end:
                    break
                if max_events is not None and self.stats["events"] >= max_events:
                    reason = "max-events"
                    break
                self.poll(listen_ms)
        except GuestUnreadableError as exc:
            reason = f"guest-unreadable: {exc}"
        except self._libvmi_error as exc:  # the domain went away
            reason = f"guest-gone: LibVMI: {exc}"
        return self.finish(reason)
