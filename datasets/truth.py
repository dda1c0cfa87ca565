"""Ground truth of recorded attacks, and the rule that labels a capture's processes with it.

A ground truth (written by the attack scenarios, ``truth.json`` of a recorded run, see
``docs/datasets.md``) names an attack's VM, its start and end (host ``time.time_ns()``, the clock of
the events' ``ts_ns``) and its *anchors*: the guest processes the attack started or took over, by pid.

The rule (:func:`attack_marks`): in the events of the truth's VM whose ``ts_ns`` falls in the window
``[started_ns, ended_ns + grace_ns]``, a process is part of the attack if its pid (or its thread
group's id) is an anchor, or if its parent chain reaches an anchor. The chain follows the events' own
``pid -> ppid`` pairs seen in the window (a parent that only ever appears as a ``ppid`` still ends a
chain at an anchor; a process seen under two parents, as after a reparenting, keeps both). Events
outside the window never count, so a pid the kernel reuses before or after the attack is normal. A
truth that marks no traced event is an error: an attack whose processes were not traced would
otherwise give a data set with silently no attack in it.

>>> from vims.events import example_events
>>> import pyarrow as pa
>>> ev = example_events([(10, "sshd", 0, None), (11, "bash", 59, "/bin/sh"), (12, "cat", 0, None),
...                      (13, "cron", 0, None)], vm_id="vm")
>>> ev = ev.set_column(ev.schema.get_field_index("ppid"), "ppid", pa.array([1, 10, 11, 1], pa.int32()))
>>> t = Truth.from_dict({"scenario": "x", "family": "demo", "vm": "vm", "started_ns": 0, "ended_ns": 10,
...                      "anchors": [{"pid": 11, "why": "the shell"}]})
>>> attack_marks(ev, [t]).tolist()
[-1, 0, 0, -1]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vims.errors import InputError
from vims.jsonfile import read_json

__all__ = ["GRACE_NS", "Truth", "attack_marks", "read_truths", "truths_from"]

#: How long after a truth's ``ended_ns`` its processes' calls still count as the attack's (the last
#: calls of a process, e.g. its exit, reach the trace a little after the scenario returns).
GRACE_NS = 2_000_000_000


@dataclass(frozen=True)
class Truth:
    """One attack's ground truth, as the labelling rule needs it (the fields of ``truth.json``)."""

    scenario: str
    family: str
    vm: str
    started_ns: int
    ended_ns: int
    anchors: tuple[int, ...]
    seed: int | None = None
    detail: Any = None
    why: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> Truth:
        """A truth from its JSON object; a missing or mistyped field is an :class:`InputError` naming it."""
        if not isinstance(data, dict):
            raise InputError(f"a ground truth is a JSON object, not {type(data).__name__}", where=where)

        def get(name: str, kind: type | tuple[type, ...], what: str) -> Any:
            if name not in data:
                raise InputError(f"ground truth lacks the field {name!r}", where=where)
            value = data[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise InputError(f"field {name!r} must be {what}, not {value!r}"[:200], where=where)
            return value

        scenario, family, vm = get("scenario", str, "text"), get("family", str, "text"), get("vm", str, "text")
        started, ended = get("started_ns", int, "an integer"), get("ended_ns", int, "an integer")
        if ended < started:
            raise InputError(f"field 'ended_ns' ({ended}) is before 'started_ns' ({started})", where=where)
        anchors = get("anchors", list, "a list of {\"pid\": N, \"why\": TEXT}")
        pids, why = [], []
        for i, anchor in enumerate(anchors):
            pid = anchor.get("pid") if isinstance(anchor, dict) else None
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
                raise InputError(f"field 'anchors[{i}].pid' must be a positive integer, not {pid!r}", where=where)
            pids.append(pid)
            why.append(str(anchor.get("why", "")))
        seed = data.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise InputError(f"field 'seed' must be an integer, not {seed!r}", where=where)
        return cls(scenario, family, vm, started, ended, tuple(pids), seed, data.get("detail"), tuple(why))

    def to_dict(self) -> dict[str, Any]:
        """The truth as its JSON object (what :meth:`from_dict` reads)."""
        anchors = [{"pid": p, "why": w} for p, w in zip(self.anchors, self.why or ("",) * len(self.anchors),
                                                         strict=True)]
        return {"scenario": self.scenario, "family": self.family, "seed": self.seed, "vm": self.vm,
                "started_ns": self.started_ns, "ended_ns": self.ended_ns, "anchors": anchors,
                "detail": self.detail}


def truths_from(data: Any, where: str | None = None) -> list[Truth]:
    """Truths from parsed JSON: one object or a list of them (``truth.json`` of a run is a list)."""
    items = data if isinstance(data, list) else [data]
    return [Truth.from_dict(item, where=f"{where}[{i}]" if where and isinstance(data, list) else where)
            for i, item in enumerate(items)]


def read_truths(paths: Iterable[str | Path]) -> list[Truth]:
    """The truths of every file in ``paths`` (each a JSON object or list); unreadable JSON is an error."""
    truths: list[Truth] = []
    for path in map(Path, paths):
        truths.extend(truths_from(read_json(path, "ground truth"), where=str(path)))
    return truths


def _children(parent: np.ndarray, pid: np.ndarray, tgid: np.ndarray) -> dict[int, set[int]]:
    """``ppid -> {pid, tgid}`` of the events given (one pass over their distinct pairs)."""
    children: dict[int, set[int]] = defaultdict(set)
    pairs = np.unique(np.stack([parent, pid, tgid], axis=1), axis=0) if len(pid) else np.empty((0, 3), np.int64)
    for p, c, g in pairs.tolist():
        if p >= 0:
            children[p].update((c, g))
    return children


def _lineage(anchors: Sequence[int], children: dict[int, set[int]]) -> set[int]:
    """The anchors and every process below them."""
    found, todo = set(anchors), list(anchors)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def attack_marks(events: pa.Table, truths: Sequence[Truth], grace_ns: int = GRACE_NS,
                 where: str | None = None) -> np.ndarray:
    """Per event, the index in ``truths`` of the attack it belongs to, or -1 (see the module's rule).

    Parameters
    ----------
    events : pyarrow.Table
        Events with ``vm_id``, ``ts_ns``, ``pid``, ``tgid`` and ``ppid`` (``EVENT_SCHEMA``).
    truths : sequence of Truth
        The attacks; an event inside two of them is marked with the later one.
    grace_ns : int
        Added to each truth's ``ended_ns``.
    where : str, optional
        Named in the error of a truth that marks no event.
    """
    marks = np.full(events.num_rows, -1, dtype=np.int64)
    if not truths:
        return marks
    ts = events["ts_ns"].to_numpy().astype(np.int64)
    pid = events["pid"].to_numpy().astype(np.int64)
    tgid = events["tgid"].to_numpy().astype(np.int64)
    ppid = pc.fill_null(events["ppid"], -1).to_numpy().astype(np.int64)
    for i, truth in enumerate(truths):
        same_vm = pc.equal(events["vm_id"], truth.vm).to_numpy(zero_copy_only=False)
        window = same_vm & (ts >= truth.started_ns) & (ts <= truth.ended_ns + grace_ns)
        attack = _lineage(truth.anchors, _children(ppid[window], pid[window], tgid[window]))
        members = np.fromiter(attack, dtype=np.int64, count=len(attack))
        hit = window & (np.isin(pid, members) | np.isin(tgid, members))
        if not hit.any():
            raise InputError(_no_match(truth, int(window.sum()), bool(same_vm.any())), where=where)
        marks[hit] = i
    return marks


def _no_match(truth: Truth, in_window: int, vm_seen: bool) -> str:
    """Why a truth marked no event, in one line."""
    pids = ", ".join(map(str, truth.anchors[:5])) + (", ..." if len(truth.anchors) > 5 else "")
    what = (f"no event of vm {truth.vm!r} in the events" if not vm_seen else
            f"no event in its window ({in_window:,} events of vm {truth.vm!r} there)" if not in_window else
            f"none of the {in_window:,} events of its window is by pid {pids} or a process below them")
    return f"ground truth of {truth.scenario!r} matches no traced process: {what}"
