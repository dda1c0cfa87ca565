"""``hidden-processes``: the task list against the pid allocator of the initial pid namespace.

A rootkit hides a process by unlinking its ``task_struct`` from ``init_task.tasks`` (what ``ps`` and
``/proc`` walk); the process keeps running and keeps its pid. Pids live in ``init_pid_ns.idr`` (an
xarray): every ``struct pid`` there that still has a task (``pid->tasks[PIDTYPE_PID]``) must be a
task the list shows, threads included. So must the task each CPU runs (``rq->curr`` of the per-cpu
``runqueues``, when the profile has them), unless it is that CPU's idle task: a process unlinked from
both the list and the pid allocator is still seen when it runs. The guest runs while the views are
read, so a process that starts or exits in between differs once; only differences that persist over
several readings fail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vims.collector.checks.base import Check, Column, Context, Row
from vims.collector.kernel import MAX_LIST, KernelView
from vims.collector.memory import GuestMemoryError
from vims.errors import VimsError

XA_CHUNK_SLOTS = 64


def _is_node(entry: int) -> bool:
    # xa_is_node: an internal entry (low bits 10) above the small internal values (siblings, retry).
    return entry & 3 == 2 and entry > 4096


class PidView:
    """Reads ``struct pid`` objects out of ``init_pid_ns.idr``."""

    def __init__(self, kernel: KernelView) -> None:
        p = kernel.profile
        self.kernel = kernel
        self.head = (kernel.symbol_address("init_pid_ns") + p.offset("pid_namespace", "idr")
                     + p.offset("idr", "idr_rt") + p.offset("xarray", "xa_head"))
        self.slots = p.offset("xa_node", "slots")
        self.nr = p.offset("pid", "numbers") + p.offset("upid", "nr")
        self.tasks = p.offset("pid", "tasks")  # tasks[PIDTYPE_PID].first: PIDTYPE_PID is 0
        self.pid_links = p.offset("task_struct", "pid_links")  # pid_links[PIDTYPE_PID]

    def pids(self) -> Iterator[int]:
        """Addresses of every ``struct pid`` in the xarray."""
        u64 = self.kernel.u64
        stack = [u64(self.head)]
        seen = 0
        while stack:
            entry = stack.pop()
            seen += 1
            if seen > MAX_LIST:
                raise GuestMemoryError("the pid xarray does not end (changed while read?)")
            if not entry:
                continue
            if _is_node(entry):
                slots = self.kernel.read(entry - 2 + self.slots, 8 * XA_CHUNK_SLOTS)
                stack.extend(int.from_bytes(slots[i:i + 8], "little") for i in range(0, len(slots), 8))
            elif entry & 3 == 0:
                yield entry  # a pointer: a struct pid

    def tasks_by_pid(self) -> dict[int, int]:
        """pid number -> ``task_struct`` address, for each pid that has a task."""
        k = self.kernel
        out = {}
        for pid in self.pids():
            first = k.u64(pid + self.tasks)
            if first:
                out[k.kernel.u32(pid + self.nr)] = first - self.pid_links
        return out


@dataclass
class _Views:
    """The three views of one reading, and what differed in every reading so far."""

    listed: dict[int, int] = field(default_factory=dict)
    allocated: dict[int, int] = field(default_factory=dict)
    running: dict[int, tuple[int, int]] | None = None
    hidden: set[int] = field(default_factory=set)
    unlisted: set[int] = field(default_factory=set)
    offlist: set[int] = field(default_factory=set)


class HiddenProcesses(Check):
    """Every task known to the pid allocator is in the task list (no process is hidden)."""

    name = "hidden-processes"
    cost = "light"
    symbols = ("init_task", "init_pid_ns")
    members = (("pid_namespace", "idr"), ("idr", "idr_rt"), ("xarray", "xa_head"), ("xa_node", "slots"),
               ("pid", "numbers"), ("upid", "nr"), ("pid", "tasks"), ("task_struct", "pid_links"),
               ("task_struct", "thread_node"), ("signal_struct", "thread_head"))
    #: A failing row is one task: its pid, name and ``task_struct``, the view that has it
    #: (``seen_in``) and the one that does not (``missing_from``): ``task list``, ``init_pid_ns`` or
    #: ``runqueue of CPU N`` (seen only).
    columns = (Column("pid", "int"), Column("comm"), Column("task", "hex"), Column("seen_in"),
               Column("missing_from"))

    #: How many times a difference must be seen before it counts, and the pause between readings.
    rounds = 3
    pause = 0.05

    def views(self, kernel: KernelView, pids: PidView) -> tuple[dict[int, int], dict[int, int]]:
        """The task list and the pid allocator's tasks, each as ``{pid: task_struct}``.

        Both change while they are read (other vCPUs run on): a read that runs into a freed task
        or node is tried again, up to :attr:`rounds` times.
        """
        failed = 0
        while True:
            try:
                listed = {kernel.kernel.u32(a + kernel._offsets.pid): a
                          for a in kernel.task_addresses(threads=True)}
                listed.pop(0, None)  # the idle task has pid 0 and no struct pid
                return listed, pids.tasks_by_pid()
            except GuestMemoryError:
                failed += 1
                if failed >= self.rounds:
                    raise
                time.sleep(self.pause)

    @staticmethod
    def running(kernel: KernelView) -> dict[int, tuple[int, int]] | None:
        """``{pid: (task_struct, cpu)}`` of the task each CPU's runqueue runs (``rq->curr``), its
        idle task left out; None when the profile lacks the runqueues."""
        p = kernel.profile
        try:
            rq = p.symbol("runqueues")  # a per-cpu variable: an offset into each CPU's area
            curr, idle = p.offset("rq", "curr"), p.offset("rq", "idle")
            cpus = kernel.kernel.u32(kernel.symbol_address("nr_cpu_ids"))
        except (VimsError, KeyError, LookupError):
            return None
        out = {}
        for cpu in range(min(cpus, 4096)):
            base = kernel.per_cpu_base(cpu) + rq
            task = kernel.u64(base + curr)
            if task and task != kernel.u64(base + idle):
                out[kernel.kernel.u32(task + kernel._offsets.pid)] = (task, cpu)
        return out

    def _differences(self, kernel: KernelView, pids: PidView) -> _Views:
        """The views read until they agree, or :attr:`rounds` times: what differs in every reading."""
        views = _Views()
        for attempt in range(self.rounds):
            views.listed, views.allocated = self.views(kernel, pids)
            try:
                views.running = self.running(kernel)
            except GuestMemoryError:
                views.running = {}  # a task freed under the read: this round sees none running
            hidden = set(views.allocated) - set(views.listed)
            unlisted = set(views.listed) - set(views.allocated)
            offlist = {pid for pid, (task, _) in (views.running or {}).items()
                       if views.listed.get(pid) != task} - hidden
            first = attempt == 0
            views.hidden = hidden if first else views.hidden & hidden
            views.unlisted = unlisted if first else views.unlisted & unlisted
            views.offlist = offlist if first else views.offlist & offlist
            if not views.hidden and not views.unlisted and not views.offlist:
                break
            if attempt + 1 < self.rounds:
                time.sleep(self.pause)
        return views

    def run(self, ctx: Context) -> Iterator[Row]:
        kernel = ctx.kernel
        v = self._differences(kernel, PidView(kernel))
        for pid in sorted(v.hidden):
            comm = str(self._comm(kernel, v.allocated[pid]))
            yield self.row(f"pid {pid} ({comm})", "fail",
                           f"task {v.allocated[pid]:#x} has pid {pid} in init_pid_ns but is not in the task list",
                           pid=pid, comm=comm, task=v.allocated[pid], seen_in="init_pid_ns",
                           missing_from="task list")
        for pid in sorted(v.offlist):
            task, cpu = (v.running or {})[pid]
            comm = str(self._comm(kernel, task))
            yield self.row(f"pid {pid} ({comm})", "fail", f"task {task:#x} runs on CPU {cpu} but is not in the "
                           "task list", pid=pid, comm=comm, task=task, seen_in=f"runqueue of CPU {cpu}",
                           missing_from="task list")
        for pid in sorted(v.unlisted):
            comm = str(self._comm(kernel, v.listed[pid]))
            yield self.row(f"pid {pid} ({comm})", "fail",
                           "in the task list but its pid is not allocated in init_pid_ns",
                           pid=pid, comm=comm, task=v.listed[pid], seen_in="task list", missing_from="init_pid_ns")
        if not v.hidden and not v.unlisted and not v.offlist:
            running = "" if v.running is None else f"; the {len(v.running)} tasks the CPUs run are among them"
            yield self.row("task list", "pass", f"{len(v.listed)} tasks in the task list, {len(v.allocated)} "
                           f"with a pid in init_pid_ns: the same{running}")

    @staticmethod
    def _comm(kernel: KernelView, task: int) -> Any:
        try:
            return kernel.task(task).comm
        except GuestMemoryError:
            return "?"
