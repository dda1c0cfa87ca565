"""Replay recorded data through the A-VM pipeline: ``vims avm replay EVENTS.parquet|TRACES.parquet``.

An event table (EVENT_SCHEMA, what ``vims collect -o`` writes) is replayed as recorded. A trace table
(TRACE_SCHEMA: public data sets, ``vims datasets import``) is turned into events first
(:func:`traces_to_events`): each trace becomes one process (``pid`` = ``base_pid`` + row number, ``comm``
= its program or ``trace``), one call after another. Replay runs at full speed or at the recorded pace
(``pace``, scaled by ``speed``), with a report at the end of every reporting interval of recorded time
(``ts_ns``), paced or not; event times are shifted to the replay's clock so event-to-score
latency means what it means live. By default a replay waits for room in the scorers' queues instead
of dropping (an analyst wants every event scored); ``lossless=False`` behaves like the live collector.

>>> import pyarrow as pa
>>> t = pa.table({"trace_id": ["a", "b"], "program": ["ls", None], "syscalls": [[1, 2], [3]]})
>>> ev = traces_to_events(t)
>>> ev.select(["seq", "pid", "comm", "nr"]).to_pylist()  # doctest: +NORMALIZE_WHITESPACE
[{'seq': 0, 'pid': 1000, 'comm': 'ls', 'nr': 1}, {'seq': 1, 'pid': 1000, 'comm': 'ls', 'nr': 2},
 {'seq': 2, 'pid': 1001, 'comm': 'trace', 'nr': 3}]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vims.errors import InputError
from vims.schemas import EVENT_SCHEMA, SCORE_SCHEMA, conform


def traces_to_events(traces: pa.Table, vm_id: str = "replay", base_pid: int = 1000,
                     spacing_ns: int = 1000) -> pa.Table:
    """An EVENT_SCHEMA table with one process per trace (calls ``spacing_ns`` apart)."""
    from vims.models import as_flat

    flat = as_flat(traces, where="traces")
    n = len(flat.values)
    if base_pid + flat.n_traces >= 2**31:
        raise InputError(f"too many traces ({flat.n_traces}) for pids from {base_pid}")
    pids = (base_pid + flat.trace_index()).astype(np.int32)
    if "program" in traces.column_names:
        programs = pc.fill_null(traces.column("program").cast(pa.string()), "trace").combine_chunks()
    else:
        programs = pa.array(["trace"] * flat.n_traces, pa.string())
    comm = programs.take(pa.array(flat.trace_index()))
    return conform(pa.table({
        "seq": pa.array(np.arange(n, dtype=np.uint64)),
        "ts_ns": pa.array(np.arange(n, dtype=np.uint64) * np.uint64(spacing_ns)),
        "vm_id": pa.array(np.full(n, vm_id, dtype=object), pa.string()),
        "vcpu": pa.array(np.zeros(n, dtype=np.uint16)),
        "pid": pa.array(pids),
        "tgid": pa.array(pids),
        "comm": comm,
        "cr3": pa.array(np.zeros(n, dtype=np.uint64)),
        "nr": pa.array(flat.values.astype(np.int32)),
        "args": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6 * n, dtype=np.uint64)), 6),
        "user_ip": pa.array(np.zeros(n, dtype=np.uint64)),
        "path": pa.nulls(n, pa.string()),
    }), EVENT_SCHEMA)


def load(path: str | Path, vm_id: str = "replay", base_pid: int = 1000) -> tuple[pa.Table, pa.Table | None]:
    """``(events, traces)`` from an event or a trace file (``traces`` is None for an event file)."""
    from vims.tables import read_table

    table = read_table(path)
    if "syscalls" in table.column_names:
        return traces_to_events(table, vm_id, base_pid), table
    if "nr" in table.column_names:
        if "path" not in table.column_names:  # event files written before the path column existed
            table = table.append_column("path", pa.nulls(table.num_rows, pa.string()))
        return conform(table, EVENT_SCHEMA, where=str(path)), None
    raise InputError("neither an event table (column 'nr') nor a trace table (column 'syscalls')", where=path)


def batches(events: pa.Table, batch_size: int) -> Iterator[pa.Table]:
    """``events`` in slices of ``batch_size`` rows."""
    for lo in range(0, events.num_rows, batch_size):
        yield events.slice(lo, batch_size)


def interval_bounds(ts_ns: np.ndarray, interval_ns: int) -> np.ndarray:
    """Row bounds of the recorded reporting intervals: interval ``k`` is rows ``bounds[k]:bounds[k + 1]``.

    Interval ``k`` holds the events recorded in ``[t0 + k * interval_ns, t0 + (k + 1) * interval_ns)``
    (``t0``: the first event's time); an event recorded before an earlier one (another vCPU's clock)
    counts in the interval of the latest time seen so far. Intervals without events are kept (empty).

    >>> interval_bounds(np.array([0, 5, 10, 35, 41]), 10).tolist()
    [0, 2, 3, 3, 4, 5]
    """
    if interval_ns < 1:
        raise InputError(f"the reporting interval must be at least 1 ns, not {interval_ns}")
    if len(ts_ns) == 0:
        return np.zeros(1, dtype=np.int64)
    ts = np.maximum.accumulate(np.asarray(ts_ns, dtype=np.int64))
    k = (ts - ts[0]) // interval_ns
    return np.searchsorted(k, np.arange(int(k[-1]) + 2), side="left").astype(np.int64)


def replay(agent: Any, events: pa.Table, batch_size: int = 4096, pace: bool = False, speed: float = 1.0,
           lossless: bool = True, drain: float = 60.0,
           on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Feed ``events`` through a started :class:`~vims.avm.agent.Agent`, reporting on its interval.

    Reports are cut by the recorded time (``ts_ns``), as a live run cuts them by the clock: a report
    at the end of every ``agent.interval_s`` seconds of recorded time (at that moment of the replay's
    clock with ``pace``, as soon as its events are in without), each holding the events recorded in
    its interval (``lossless`` waits for them to be scored first). The last, unfinished interval is
    left for the caller's final ``agent.report()``. Returns the run's counts: events sent, seconds,
    events per second, reports made, and whether everything sent was scored (or counted lost)
    within ``drain`` seconds.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, not {batch_size}")
    if speed <= 0:
        raise InputError(f"speed must be positive, not {speed}")
    ts = events.column("ts_ns").to_numpy().astype(np.int64) if events.num_rows else np.zeros(0, np.int64)
    bounds = interval_bounds(ts, max(1, round(float(agent.interval_s) * 1e9)))
    t0_wall = time.time_ns()
    t0 = time.monotonic()
    ts0 = int(ts[0]) if len(ts) else 0
    sent = reports = 0
    for k in range(len(bounds) - 1):
        for batch in batches(events.slice(bounds[k], bounds[k + 1] - bounds[k]), batch_size):
            sent += _send(agent, batch, ts0, t0, t0_wall, pace, speed, lossless)
            if on_batch is not None:
                on_batch(batch.num_rows)
        if k == len(bounds) - 2:
            break  # the interval the recording ends in: the caller's final report closes it
        if pace:
            _sleep_until(t0 + (k + 1) * float(agent.interval_s) / speed)
        if lossless:
            agent.pipeline.drain(drain)
        agent.report()
        reports += 1
    sending = time.monotonic() - t0
    drained = agent.pipeline.drain(drain)
    seconds = time.monotonic() - t0
    return {"events": sent, "send_seconds": round(sending, 3), "seconds": round(seconds, 3),
            "events_per_s": round(sent / seconds, 1) if seconds > 0 else None, "reports": reports,
            "drained": drained}


def replay_reports(model: Any, events: pa.Table, interval_s: float, vm_id: str = "replay",
                   workers: int = 1, **agent_options: Any) -> list[tuple[int, dict[str, Any]]]:
    """Every report an A-VM scoring with ``model`` makes on recorded ``events``, as REM-S would get them.

    The events are replayed at full speed through a new :class:`~vims.avm.agent.Agent` (losslessly,
    reports cut by recorded time every ``interval_s``, see :func:`replay`), and each report is returned
    with the end of its interval on the recording's clock (``ts_ns`` of the events), so that reports
    can be set against a ground truth recorded on the same clock. ``agent_options`` go to the agent
    (``threshold``, ``top``, ``min_windows``, ...).

    Returns
    -------
    list of (int, dict)
        ``(end of the interval in ns, report)``, oldest first; the last interval may be shorter.
    """
    from vims.avm.agent import Agent

    if events.num_rows == 0:
        raise InputError("no events to replay")
    if not interval_s > 0:
        raise InputError(f"the reporting interval must be positive, not {interval_s}")
    events = events.sort_by("ts_ns")
    reports: list[dict[str, Any]] = []
    with Agent(model, vm_id=vm_id, workers=workers, interval_s=interval_s, **agent_options) as agent:
        agent.sinks.append(reports.append)
        replay(agent, events)
        agent.report()
    t0 = int(events["ts_ns"][0].as_py())
    step = max(1, round(interval_s * 1e9))
    return [(t0 + (k + 1) * step, r) for k, r in enumerate(reports)]


def _sleep_until(deadline: float) -> None:
    lag = deadline - time.monotonic()
    if lag > 0:
        time.sleep(lag)


def _send(agent: Any, batch: pa.Table, ts0: int, t0: float, t0_wall: int, pace: bool, speed: float,
          lossless: bool) -> int:
    """Send one batch with its times moved to the replay's clock (at its recorded moment with ``pace``)."""
    if pace:
        _sleep_until(t0 + (int(batch.column("ts_ns")[0].as_py()) - ts0) / 1e9 / speed)
        shifted = t0_wall + ((batch.column("ts_ns").to_numpy().astype(np.int64) - ts0) / speed).astype(np.int64)
    else:
        shifted = np.full(batch.num_rows, time.time_ns(), dtype=np.int64)
    batch = batch.set_column(batch.schema.get_field_index("ts_ns"), "ts_ns", pa.array(shifted.astype(np.uint64)))
    agent.send(batch, wait=3600.0 if lossless else 0.0)
    return batch.num_rows


def score_table(agent: Any, traces: pa.Table | None, base_pid: int = 1000) -> pa.Table:
    """The replay's final per-process scores: SCORE_SCHEMA rows for a trace table, else per process.

    ``anomalous`` compares the trace score with the model's threshold of each process's program.
    """
    scores = agent.builder.trace_scores()
    thresholds = _thresholds(agent)
    if traces is not None:
        n = traces.num_rows
        score = np.zeros(n)
        seen = np.zeros(n, dtype=bool)
        anomalous = np.zeros(n, dtype=bool)
        for (pid, _comm), (s, _calls, program) in scores.items():
            i = pid - base_pid
            if 0 <= i < n:
                score[i], seen[i] = s, True
                anomalous[i] = s > thresholds.get(program, np.inf)
        cols = {name: (traces.column(name) if name in traces.column_names else pa.nulls(n, pa.string()))
                for name in ("trace_id", "split", "label", "family", "program")}
        table = pa.table({**cols, "score": pa.array(score), "anomalous": pa.array(anomalous)})
        return conform(table.filter(pa.array(seen)), SCORE_SCHEMA)
    rows = [{"pid": pid, "comm": comm, "program": program, "calls": calls, "score": s,
             "anomalous": bool(s > thresholds.get(program, np.inf))}
            for (pid, comm), (s, calls, program) in sorted(scores.items())]
    return pa.Table.from_pylist(rows, schema=pa.schema([("pid", pa.int32()), ("comm", pa.string()),
                                                       ("program", pa.string()), ("calls", pa.int64()),
                                                       ("score", pa.float64()), ("anomalous", pa.bool_())]))


def _thresholds(agent: Any) -> dict[str, float]:
    """Trace-score threshold of each program key the model knows (``*``: the single or fallback model)."""
    model = agent.model
    if hasattr(model, "for_program") and hasattr(model, "programs"):
        out = {key: float(-det.offset_) for key, det in model.programs().items()}
        return out
    return {"*": float(-model.offset_)}
