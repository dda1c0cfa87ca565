"""``hidden-processes``: the task list against the pid allocator of the initial pid namespace.

A rootkit hides a process by unlinking its ``task_struct`` from ``init_task.tasks`` (what ``ps`` and
``/proc`` walk); the process keeps running and keeps its pid. Pids live in ``init_pid_ns.idr`` (an
xarray): every ``struct pid`` there that still has a task (``pid->tasks[PIDTYPE_PID]``) must be a
task the list shows, threads included. The guest runs while both views are read, so a process that
starts or exits in between differs once; only differences that persist over several readings fail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from vims.collector.checks.base import Check, Column, Context, Row
from vims.collector.kernel import MAX_LIST, KernelView
from vims.collector.memory import GuestMemoryError

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


class HiddenProcesses(Check):
    """Every task known to the pid allocator is in the task list (no process is hidden)."""

    name = "hidden-processes"
    cost = "light"
    symbols = ("init_task", "init_pid_ns")
    members = (("pid_namespace", "idr"), ("idr", "idr_rt"), ("xarray", "xa_head"), ("xa_node", "slots"),
               ("pid", "numbers"), ("upid", "nr"), ("pid", "tasks"), ("task_struct", "pid_links"),
               ("task_struct", "thread_node"), ("signal_struct", "thread_head"))
    #: A failing row is one task: its pid, name and ``task_struct``, the view that has it
    #: (``seen_in``) and the one that does not (``missing_from``): ``task list`` or ``init_pid_ns``.
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

    def run(self, ctx: Context) -> Iterator[Row]:
        kernel = ctx.kernel
        pids = PidView(kernel)
        hidden: set[int] | None = None
        unlisted: set[int] | None = None
        listed: dict[int, int] = {}
        allocated: dict[int, int] = {}
        for attempt in range(self.rounds):
            listed, allocated = self.views(kernel, pids)
            now_hidden = set(allocated) - set(listed)
            now_unlisted = set(listed) - set(allocated)
            hidden = now_hidden if hidden is None else hidden & now_hidden
            unlisted = now_unlisted if unlisted is None else unlisted & now_unlisted
            if not hidden and not unlisted:
                break
            if attempt + 1 < self.rounds:
                time.sleep(self.pause)
        for pid in sorted(hidden or ()):
            comm = str(self._comm(kernel, allocated[pid]))
            yield self.row(f"pid {pid} ({comm})", "fail",
                           f"task {allocated[pid]:#x} has pid {pid} in init_pid_ns but is not in the task list",
                           pid=pid, comm=comm, task=allocated[pid], seen_in="init_pid_ns",
                           missing_from="task list")
        for pid in sorted(unlisted or ()):
            comm = str(self._comm(kernel, listed[pid]))
            yield self.row(f"pid {pid} ({comm})", "fail",
                           "in the task list but its pid is not allocated in init_pid_ns",
                           pid=pid, comm=comm, task=listed[pid], seen_in="task list", missing_from="init_pid_ns")
        if not hidden and not unlisted:
            yield self.row("task list", "pass", f"{len(listed)} tasks in the task list, {len(allocated)} "
                           "with a pid in init_pid_ns: the same")

    @staticmethod
    def _comm(kernel: KernelView, task: int) -> Any:
        try:
            return kernel.task(task).comm
        except GuestMemoryError:
            return "?"
