"""System-call tracing from inside QEMU's translator: the ``vims_syscall`` TCG plugin's rings into rows.

A guest started with ``Guest.start(..., plugin=True)`` runs under QEMU 10 with the plugin
(:mod:`vims.collector.plugin`), which records every user-space ``syscall`` instruction of every vCPU
into a per-vCPU shared-memory ring as it executes: the call number, six arguments, the return
address, the user stack pointer, CR3, the kernel GS base and the current task, read at that moment
from the per-cpu ``current_task`` (the offset is written into the plugin's control area here). The
vCPU never waits: a full ring drops the record and counts it, per vCPU (``stats["dropped"]``,
``stats["dropped_per_vcpu"]``), never silently.

This tracer takes the records in batches and hands each to the same
:class:`~vims.collector.recorder.EventRecorder` as the watchpoint tracer, so the rows are the same
:data:`~vims.schemas.EVENT_SCHEMA` rows (with ``method`` = ``plugin`` in the result): identity from the
task read at the call (cached per task, re-read after ``execve``/``exit``/``prctl``), path, ``argv``,
call site, program filter and cap.

The plugin also reads the task's pid, tgid and comm at the call (the offsets come from the profile),
so a row names its caller as it was then, also when it ``execve``'d or exited before the row is made.
The path argument of the calls that take one (up to 95 bytes) and the command line of an ``execve``
(up to 127 bytes) are copied by the plugin at the call too (the guest's call numbers and argument
positions are written into the control area), so they are what the program passed, and an
``execve``'s argv is there although a successful exec replaces the memory it was in. The parent
(``real_parent``'s tgid) is read at the call too: read later, a task that had exited by then could
have left its ``task_struct`` to another task, whose parent the row would have named. Read later
than the call, from the task pointer (cached per task): ``mm``; and a path the plugin
could not read at the call (its page not present then) or longer than its 95 bytes is not re-read:
the plugin's copy, cut, is kept; only when the plugin read nothing is it read after the fact (up to
a batch's wait behind, ``stats["lag_ms_max"]``), where a buffer the program reused shows what it
holds now and cannot be told from the original.

Policy: the duty cycle switches the plugin on and off through the control area (no trap to put in,
no restart); the program filter (include/exclude) is written there too and applied by the plugin at
the call, on the comm it reads (a program it does not keep takes no ring slot and no share of the cap:
``stats["plugin_filtered"]``), and so is the call filter, on the call number, before the plugin reads
anything else (a bitmap of the numbers below 512; a larger number, an x32 call, passes it and is
filtered here), where its patterns are ones C's ``fnmatch`` reads as Python does (plain
characters, ``*``, ``?``: :func:`~vims.collector.plugin.plugin_filters`); the per-second cap is applied
in the plugin (per vCPU, cap / vCPUs) whenever the plugin applies the whole filter. The recorder
applies the policy again to what arrives, so a filter the plugin cannot apply, or a caller it could not
read, is still filtered, and a policy change is exact from the next call on.
Events delivered / calls seen (``stats["seen"]``, counted by the plugin while on) is
``stats["delivered_share"]``.

Use::

    guest = Guest.start(build_guest(), plugin=True)
    with QemuBackend.from_guest(guest) as backend:
        result = PluginTracer(backend, "vm-1").run(duration=10)
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from vims.collector.backends.qemu import QemuBackend
from vims.collector.plugin import (
    CALL_NUMBERS,
    FLAG_ARGV,
    FLAG_IDENTITY,
    FLAG_PATH,
    FLAG_PPID,
    FLAG_TASK_UNREAD,
    Rings,
    plugin_filters,
)
from vims.collector.recorder import EXECVE, EventRecorder, GuestUnreadableError, RecordingTracer, TraceResult
from vims.collector.tracer import TracerError
from vims.errors import VimsError
from vims.syscalls import EXECVE_CALLS
from vims.tracing_policy import Policy

__all__ = ["PluginTracer"]


class PluginTracer(RecordingTracer):
    """Take the QEMU plugin's ring records and turn them into event rows.

    Parameters
    ----------
    backend : QemuBackend
        The guest, started with ``plugin=True`` (its ``guest.plugin_shm`` names the rings); the tracer
        reads memory through its :attr:`~QemuBackend.kernel` and never uses the GDB stub.
    vm_id : str
        Written in every row.
    policy : Policy, optional
        Sampling; default: trace everything.
    callsites : bool
        Fill the ``site`` column.
    batch_rows, batch_ms : int
        A batch is handed to ``on_batch`` after this many rows or this long, whichever comes first.
    on_batch : callable, optional
        Receives each :class:`pyarrow.RecordBatch`; it must not block.
    keep : bool
        Keep every batch for :attr:`TraceResult.events`.
    rings : str or Path, optional
        The plugin's shared memory (default: the guest's ``plugin_shm``).
    poll_ms : float
        How long the loop sleeps when every ring is empty.
    """

    method = "plugin"

    def __init__(self, backend: QemuBackend, vm_id: str, *, policy: Policy | None = None, callsites: bool = True,
                 batch_rows: int = 2048, batch_ms: int = 250,
                 on_batch: Callable[[pa.RecordBatch], Any] | None = None, keep: bool = True,
                 rings: Any = None, poll_ms: float = 5.0) -> None:
        if not isinstance(vm_id, str):
            raise VimsError("PluginTracer(backend, vm_id): the vm id is text")
        if rings is None:
            guest = getattr(backend, "guest", None)
            rings = getattr(guest, "plugin_shm", None)
            if rings is None:
                raise TracerError("the guest was not started with the syscall plugin: "
                                  "`vims guest up --tracer plugin` (or Guest.start(..., plugin=True))")
        self.backend = backend
        self.view = view = backend.kernel
        self.rings = Rings(rings)
        if not self.rings.registers_ok:
            missing = self.rings.missing_registers or "(vCPU 0 not started yet)"
            self.rings.close()
            raise TracerError(f"the QEMU plugin cannot read the registers {missing}: this QEMU does not "
                              "offer them to plugins")
        offset = view.current_task_offset
        if offset is None:
            self.rings.close()
            raise TracerError("the kernel profile has no per-cpu symbol 'current_task': the plugin cannot "
                              "read the task at the call")
        self._task_offset = offset
        self._task_fields = view.task_id_offsets
        self.policy = policy or Policy()
        self.poll_ns = int(poll_ms * 1e6)
        self.recorder = EventRecorder(view, vm_id, self.policy, callsites, batch_rows, batch_ms, on_batch, keep)
        qemu = getattr(getattr(backend, "guest", None), "state", {}).get("qemu_version", "?")
        #: Notes for the user.
        self.notes: list[str] = [f"QEMU {qemu} TCG plugin vims_syscall: every syscall instruction, "
                                 f"{self.rings.vcpus} vCPU ring(s) of {self.rings.slots} records",
                                 *self.recorder.notes]
        self.names = self.recorder.names
        self.stats = self.recorder.stats
        self.stats.update(seen=0, dropped=0, plugin_capped=0, plugin_filtered=0, task_unread=0, lag_ms_max=0.0,
                          dropped_per_vcpu=[0] * self.rings.vcpus)
        self._base = {name: [self.rings.counter(v, name) for v in range(self.rings.vcpus)]
                      for name in ("seen", "dropped", "capped", "filtered")}

    def _policy_switched(self) -> None:
        self._write_policy()

    def _write_policy(self) -> None:
        """The policy's program and call filters and its cap into the plugin's control area, where it
        can apply them (the call filter always: it is a bitmap of the call numbers below 512)."""
        p = self.policy
        in_plugin = plugin_filters(p.include, p.exclude)
        cap = 0
        if p.max_events_per_s is not None and (in_plugin or not (p.include or p.exclude)):
            cap = max(1, math.ceil(p.max_events_per_s / self.rings.vcpus))
        calls = frozenset(nr for nr in range(CALL_NUMBERS) if p.wants_call(nr)) if p.filters_calls else None
        self.rings.control(cap_per_s=cap, programs=(p.include, p.exclude) if in_plugin else ((), ()),
                           calls=calls, call_filter=p.filters_calls)

    def run(self, duration: float | None = None, stop: threading.Event | None = None,
            max_events: int | None = None, progress: Callable[[dict[str, Any]], Any] | None = None,
            progress_s: float = 0.5) -> TraceResult:
        """Trace until ``duration`` seconds pass, ``stop`` is set or ``max_events`` are kept.

        The plugin is switched off at the end (the guest runs on untouched); the records still in the
        rings then are made into rows too.
        """
        stop = stop or threading.Event()
        rec = self.recorder
        rings = self.rings
        argv_args = {nr: 1 if nr == EXECVE else 2 for nr in EXECVE_CALLS}
        self.rings.control(task_offset=self._task_offset, task_fields=self._task_fields,
                           strings=(rec.path_args, argv_args))
        self._write_policy()
        # Records left from an earlier trace of this guest are not this one's.
        for v in range(rings.vcpus):
            rings.take(v)
        rec.restart_clock()
        start = last_progress = rec.start_ns
        end = None if duration is None else start + int(duration * 1e9)
        armed_ns, armed_since, armed = 0, 0, False
        reason = "duration"
        try:
            while True:
                now = time.monotonic_ns()
                if stop.is_set():
                    reason = "interrupted"
                    break
                if end is not None and now >= end:
                    break
                if max_events is not None and self.stats["events"] >= max_events:
                    reason = "max-events"
                    break
                self._apply_new_policy(now)  # one REM-S gave meanwhile (set_policy)
                want = rec.sampler.armed(now)
                if want != armed:
                    rings.control(enabled=want)
                    if want:
                        armed_since = now
                    else:
                        armed_ns += now - armed_since
                    armed = want
                if not self._drain(max_events):
                    time.sleep(self.poll_ns / 1e9)
                rec.due(time.monotonic_ns())
                if progress is not None and now - last_progress >= progress_s * 1e9:
                    last_progress = now
                    progress(rec.progress(now))
            if armed:
                armed_ns += time.monotonic_ns() - armed_since
            rings.control(enabled=False)
            armed = False
            self._drain(max_events)
        except GuestUnreadableError as exc:
            reason = f"guest-unreadable: {exc}"
        finally:
            if armed:
                armed_ns += time.monotonic_ns() - armed_since
            rings.control(enabled=False)
            self._count()
        result = rec.result(reason, self.method, armed_ns)
        return result

    def _drain(self, max_events: int | None) -> int:
        """Make rows of what the rings hold now; the number of records taken."""
        rec = self.recorder
        rings = self.rings
        taken = 0
        for vcpu in range(rings.vcpus):
            records = rings.take(vcpu, limit=rec.batch_rows)
            if not len(records):
                continue
            taken += len(records)
            lag = (time.time_ns() - int(records["ts_ns"][0])) / 1e6
            if lag > self.stats["lag_ms_max"]:
                self.stats["lag_ms_max"] = round(lag, 1)
            unread = records["flags"] & FLAG_TASK_UNREAD
            self.stats["task_unread"] += int(unread.astype(bool).sum())
            record = rec.record
            known = (records["flags"] & FLAG_IDENTITY).astype(bool).tolist()
            parents = np.where(records["flags"] & FLAG_PPID, records["ppid"].astype(np.int64), -1).tolist()
            comms = [c.split(b"\0", 1)[0].decode("utf-8", "replace") for c in records["comm"].tolist()]
            flags = records["flags"]
            paths = [p.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") if f & FLAG_PATH else None
                     for p, f in zip(records["path"].tolist(), flags.tolist(), strict=True)]
            argvs = [a.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") if f & FLAG_ARGV else None
                     for a, f in zip(records["argv"].tolist(), flags.tolist(), strict=True)]
            for ts, nr, args, ip, sp, cr3, task, kgs, pid, tgid, comm, ok, path, argv, ppid in zip(
                    records["ts_ns"].tolist(), records["nr"].tolist(), records["args"].tolist(),
                    records["ip"].tolist(), records["sp"].tolist(), records["cr3"].tolist(),
                    records["task"].tolist(), records["kgs"].tolist(), records["pid"].tolist(),
                    records["tgid"].tolist(), comms, known, paths, argvs, parents, strict=True):
                record(vcpu, nr, tuple(args), ip, kgs, cr3, ts, sp, task=task,
                       who=(pid, tgid, comm) if ok else None, path_text=path, argv_text=argv,
                       ppid=ppid if ok and ppid >= 0 else None)
                if max_events is not None and self.stats["events"] >= max_events:
                    break
            rec.due(time.monotonic_ns())
        self._count()
        return taken

    def _count(self) -> None:
        """The plugin's counters since this tracer started: seen, dropped (per vCPU), capped, filtered."""
        rings, base = self.rings, self._base
        per = [rings.counter(v, "dropped") - base["dropped"][v] for v in range(rings.vcpus)]
        s = self.stats
        s["dropped_per_vcpu"] = per
        s["dropped"] = sum(per)
        s["seen"] = sum(rings.counter(v, "seen") - base["seen"][v] for v in range(rings.vcpus))
        s["plugin_capped"] = sum(rings.counter(v, "capped") - base["capped"][v] for v in range(rings.vcpus))
        s["plugin_filtered"] = sum(rings.counter(v, "filtered") - base["filtered"][v] for v in range(rings.vcpus))
        s["delivered_share"] = round(s["events"] / s["seen"], 4) if s["seen"] else 0.0

    def close(self) -> None:
        """Switch the plugin off and unmap its rings."""
        self.rings.control(enabled=False)
        self.rings.close()
