"""The A-VM analysis pipeline: a dispatcher, scorer worker processes and an aggregator, over ZeroMQ.

::

    collector ──send()──> Dispatcher ──PUSH/PULL (one per worker)──> scorer worker processes
    (tracer, replay)      (partition by pid,                           (WindowScorer: per-(vm_id, pid)
                           bounded queues)                              windows and scores)
                                                                             │ PUSH/PULL
    reports <── Aggregator (thread) <────────────────────────────────────────┘

Everything on the wire is :mod:`vims.collector.stream`: Arrow IPC batches with a sender id and a
sequence number. The dispatcher keeps one :class:`~vims.collector.stream.BatchSender` per worker slot
and routes every process (by ``pid``) to the same slot, so per-process state lives in one worker. The
events keep their ``vm_id``: a worker keys processes by ``(vm_id, pid)``, so the same pid in two VMs
(one A-VM pipeline fed by several collectors) are two processes, and result rows say which VM. On the
link to a worker every part holds one VM's events, its ``vm_id`` in the schema metadata
(``vims.vm_id``) rather than a column (a string column per event would cost the dispatcher more).

Flow control
------------
- :meth:`Pipeline.send` never blocks (unless a replay asks it to wait for room): a worker slot whose
  queue is full drops the batch and counts it (``dropped``). Memory is bounded by
  ``workers x (queue_size + 2 x hwm)`` batches in flight, plus ``max_processes`` per worker.
- Each worker echoes the sequence number of the batch it scored in its result's schema metadata. A
  hole in those numbers that the dispatcher did not drop was lost on the way or inside a worker that
  died: counted as ``missing`` (by the rows of the batches lost). Gaps in the events' own ``seq``
  column at the dispatcher (the collector numbered events that never arrived) count as ``missing`` too.
- A supervisor thread restarts a worker that died (``restarts``); its processes start over with fresh
  state. The agent keeps running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vims.collector.stream import BatchReceiver, BatchSender, Message
from vims.errors import InputError

#: Columns the scorers need; the dispatcher sends only these (the rest stays with the collector).
SCORER_COLUMNS = ("seq", "ts_ns", "vm_id", "pid", "tgid", "comm", "nr", "user_ip", "path", "ppid", "argv", "site")

#: Latency histogram bin edges, seconds: 20 bins a decade from 10 µs to 100 s.
LATENCY_EDGES = np.geomspace(1e-5, 100.0, 141)


def latency_histogram(ts_ns: np.ndarray, now_ns: int) -> dict[int, int]:
    """Counts of ``now - ts`` per bin of :data:`LATENCY_EDGES` (bin 0 below, 141 above the range)."""
    lat = (now_ns - ts_ns.astype(np.int64)) / 1e9
    bins, counts = np.unique(np.searchsorted(LATENCY_EDGES, lat), return_counts=True)
    return {int(b): int(c) for b, c in zip(bins, counts, strict=True)}


def histogram_quantile(hist: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile (seconds) of a latency histogram, at the geometric middle of its bin.

    >>> h = latency_histogram(np.array([0, 0, 0], dtype=np.int64), 10_000_000)  # 10 ms
    >>> round(histogram_quantile(h, 0.5) * 1000, 1)
    9.4
    """
    total = sum(hist.values())
    if total == 0:
        return None
    acc = 0
    for b in sorted(hist):
        acc += hist[b]
        if acc >= q * total:
            lo = LATENCY_EDGES[max(b - 1, 0)]
            hi = LATENCY_EDGES[min(b, len(LATENCY_EDGES) - 1)]
            return float(np.sqrt(lo * hi))
    return float(LATENCY_EDGES[-1])


# -- worker process -----------------------------------------------------------------------------------

@dataclass
class WorkerSpec:
    """What a scorer worker needs: a model file (written by :func:`vims.models.persist.save_model`)."""

    model: str
    window: int | None = None
    threshold: float | None = None
    max_processes: int = 65536
    hwm: int = 4
    result_queue: int = 1024
    segment: bool = True

    def argv(self, slot: int, gen: int, in_endpoint: str, out_endpoint: str) -> list[str]:
        """The command line of one worker process."""
        return [sys.executable, "-m", "vims.avm.pipeline", "worker", str(slot), str(gen), in_endpoint,
                out_endpoint, json.dumps(asdict(self))]


def load_model_any(model: Any) -> Any:
    """A fitted model from a model file (the safe skops loader) or the object itself."""
    if isinstance(model, str | Path):
        from vims.models.persist import load_model

        return load_model(model)[0]
    return model


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (no orphaned scorers)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(slot: int, gen: int, in_endpoint: str, out_endpoint: str, spec: WorkerSpec) -> None:
    """One scorer worker: PULL events, score them, PUSH one result table per batch."""
    from vims.avm.scoring import RESULT_SCHEMA, WindowScorer

    _die_with_parent()
    parent = os.getppid()
    scorer = WindowScorer(load_model_any(spec.model), window=spec.window, threshold=spec.threshold,
                          max_processes=spec.max_processes, segment=spec.segment)
    rx = BatchReceiver(in_endpoint, bind=False, hwm=spec.hwm)
    tx = BatchSender(out_endpoint, sender=f"scorer-{slot}.{gen}", kind="result", queue_size=spec.result_queue)
    # Say hello so the pipeline knows this worker is up (an empty result with no input seq).
    tx.send(RESULT_SCHEMA.empty_table().replace_schema_metadata(
        {"vims.slot": str(slot), "vims.gen": str(gen), "vims.hello": str(os.getpid())}))
    try:
        while True:
            msg = rx.recv(timeout=0.5)
            if msg is None:
                if os.getppid() != parent:  # the agent is gone: do not linger as an orphan
                    return
                continue
            meta = {"vims.slot": str(slot), "vims.gen": str(gen), "vims.input_seq": str(msg.seq),
                    "vims.input_rows": str(msg.batch.num_rows)}
            vm = (msg.batch.schema.metadata or {}).get(b"vims.vm_id")
            try:
                result = scorer.score(msg.batch, vm_id=None if vm is None else vm.decode())
            except Exception as exc:  # a bad batch must not kill the worker; the aggregator counts it
                result = RESULT_SCHEMA.empty_table()
                meta["vims.error"] = f"{type(exc).__name__}: {exc}"[:500]
            now = time.time_ns()
            if "ts_ns" in msg.batch.column_names and msg.batch.num_rows:
                hist = latency_histogram(msg.batch.column("ts_ns").to_numpy(), now)
                meta["vims.latency"] = json.dumps(hist)
            meta["vims.evicted"] = str(scorer.evicted)
            tx.send(result.replace_schema_metadata(meta))
    except KeyboardInterrupt:
        pass
    finally:
        tx.close(timeout=1.0)
        rx.close()


# -- dispatcher, supervisor, aggregator ------------------------------------------------------------------

@dataclass
class _Slot:
    """One worker slot: its sender, its process, what was sent and what came back."""

    sender: BatchSender
    process: Any = None
    gen: int = 0
    restarts: int = 0
    #: rows of each accepted seq not yet echoed back (and whether the dispatcher dropped it)
    pending: OrderedDict[int, tuple[int, bool]] = field(default_factory=OrderedDict)
    next_echo: int = 0
    scored_rows: int = 0
    missing_rows: int = 0
    errors: int = 0
    last_error: str | None = None
    started: float = 0.0
    next_start: float = 0.0
    backoff: float = 0.0
    ready: bool = False
    exits: list[dict[str, Any]] = field(default_factory=list)


class Pipeline:
    """Dispatcher + scorer workers + aggregator.

    Parameters
    ----------
    model : str, Path or fitted model
        A model file (loaded safely in each worker) or a fitted per-call detector / model set.
    workers : int
        Scorer worker processes.
    queue_size : int
        Batches that may wait per worker in the dispatcher; beyond that they are dropped and counted.
    hwm : int
        ZeroMQ high-water mark (messages) on each worker link, both ends.
    on_result : callable, optional
        Called in the aggregator thread with every result table (:data:`vims.avm.scoring.RESULT_SCHEMA`)
        and its metadata dict.
    window, threshold, max_processes, segment
        Passed to each worker's :class:`~vims.avm.scoring.WindowScorer`.
    """

    def __init__(self, model: Any, workers: int = 2, queue_size: int = 16, hwm: int = 4,
                 on_result: Callable[[pa.Table, dict[str, str]], None] | None = None,
                 window: int | None = None, threshold: float | None = None, max_processes: int = 65536,
                 restart: bool = True, columns: tuple[str, ...] = SCORER_COLUMNS,
                 capture_stderr: bool = True, segment: bool = True) -> None:
        if workers < 1:
            raise InputError(f"workers must be at least 1, not {workers}")
        model_obj = model
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if not isinstance(model, str | Path):
            # Workers load models only from safe model files: write ours to one.
            from vims.models.persist import save_model

            self._tmp = tempfile.TemporaryDirectory(prefix="vims-avm-")
            model = Path(self._tmp.name) / "model.skops"
            save_model(self._model_obj_check(model_obj), model)
        self.spec = WorkerSpec(str(model), window, threshold, max_processes, hwm, segment=segment)
        self.n_workers = workers
        self.queue_size = queue_size
        self.hwm = hwm
        self.on_result = on_result
        self.restart = restart
        self.capture_stderr = capture_stderr
        self.columns = columns
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.results = BatchReceiver("tcp://127.0.0.1:*", hwm=10000)
        self.slots: list[_Slot] = []
        for i in range(workers):
            sender = BatchSender("tcp://127.0.0.1:*", sender=f"dispatch-{i}", kind="event", bind=True,
                                 queue_size=queue_size, hwm=hwm)
            self.slots.append(_Slot(sender))
        # ingest counters
        self.seen = 0
        self.seq_missing = 0
        self._next_event_seq: dict[str, int] = {}
        self.latency: dict[int, int] = {}
        self.result_errors = 0
        self.started = False
        self._threads: list[threading.Thread] = []

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self, wait: float = 60.0) -> Pipeline:
        """Start the workers and the aggregator and supervisor threads; wait until every worker is up."""
        for i in range(self.n_workers):
            self._spawn(i)
        for target, name in ((self._aggregate, "vims-aggregator"), (self._supervise, "vims-supervisor")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.started = True
        self.wait_ready(wait)
        return self

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until every worker slot's current worker has said hello (it is connected and loaded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s.ready for s in self.slots):
                return True
            time.sleep(0.02)
        return False

    @staticmethod
    def _model_obj_check(model: Any) -> Any:
        from vims.avm.scoring import WindowScorer

        WindowScorer(model)  # refuses a whole-trace or unfitted model here, not in every worker
        return model

    def _spawn(self, i: int) -> None:
        slot = self.slots[i]
        slot.gen += 1
        slot.ready = False
        slot.started = time.monotonic()
        argv = self.spec.argv(i, slot.gen, slot.sender.endpoint, self.results.endpoint)
        slot.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE if self.capture_stderr else None)

    def _supervise(self) -> None:
        while not self._stop.wait(0.1):
            for i, slot in enumerate(self.slots):
                p = slot.process
                if p is None or p.poll() is None or self._stop.is_set():
                    continue
                now = time.monotonic()
                if slot.next_start == 0.0:
                    err = p.stderr.read().decode(errors="replace")[-500:] if p.stderr is not None else None
                    slot.exits.append({"slot": i, "pid": p.pid, "exitcode": p.returncode, "time": time.time(),
                                       "stderr": err})
                    del slot.exits[:-20]
                    # a worker that dies at once would spin: back off up to 5 s
                    quick = now - slot.started < 2.0
                    slot.backoff = min(5.0, max(0.2, slot.backoff * 2)) if quick else 0.0
                    slot.next_start = now + slot.backoff
                if self.restart and now >= slot.next_start:
                    slot.restarts += 1
                    slot.next_start = 0.0
                    self._spawn(i)

    def worker_pids(self) -> list[int | None]:
        """The OS process id of each worker slot's current worker."""
        return [s.process.pid if s.process is not None else None for s in self.slots]

    def close(self, drain: float = 0.0) -> None:
        """Stop everything (after up to ``drain`` s for what is in flight to be scored)."""
        if drain > 0:
            self.drain(drain)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        for slot in self.slots:
            slot.sender.close(timeout=0.2)
            if slot.process is not None and slot.process.poll() is None:
                slot.process.terminate()
        for slot in self.slots:
            if slot.process is not None:
                try:
                    slot.process.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    slot.process.kill()
                    slot.process.wait(timeout=5.0)
                if slot.process.stderr is not None:
                    slot.process.stderr.close()
        self.results.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Pipeline:
        if not self.started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- dispatcher ---------------------------------------------------------------------------------
    def send(self, events: pa.Table | pa.RecordBatch, wait: float = 0.0) -> bool:
        """Route an EVENT_SCHEMA batch to the workers by pid (with its ``vm_id``); ``True`` if no part was dropped.

        Never blocks when ``wait`` is 0 (the collector's case); a replay may wait up to ``wait`` s per
        part for room in a worker's queue instead of dropping.
        """
        if isinstance(events, pa.RecordBatch):
            events = pa.Table.from_batches([events])
        n = events.num_rows
        if n == 0:
            return True
        names = set(events.schema.names)  # once: Table.column_names builds a new list every time
        with self._lock:
            self.seen += n
            self._count_seq_gaps(events, names)
        ok = True
        for vm_events in _by_vm(events, [c for c in self.columns if c in names], names):
            for i, part in self._partition(vm_events):
                ok &= self._send_part(i, part, wait)
        return ok

    def _partition(self, events: pa.Table) -> list[tuple[int, pa.Table]]:
        """``(worker slot, its part)`` of a batch, by pid."""
        if self.n_workers == 1:
            return [(0, events)]
        slot_of = events.column("pid").to_numpy().astype(np.int64) % self.n_workers
        order = np.argsort(slot_of, kind="stable")
        counts = np.bincount(slot_of, minlength=self.n_workers)
        sorted_events = events.take(pa.array(order))
        parts, lo = [], 0
        for i, c in enumerate(counts.tolist()):
            if c:
                parts.append((i, sorted_events.slice(lo, c)))
            lo += c
        return parts

    def _count_seq_gaps(self, events: pa.Table, names: set[str]) -> None:
        if "seq" not in names:
            return
        seq = events.column("seq").to_numpy().astype(np.int64)
        vm = events.column("vm_id")[0].as_py() if "vm_id" in names else ""
        expected = self._next_event_seq.get(vm)
        gaps = 0
        if expected is not None and seq[0] > expected:
            gaps += int(seq[0] - expected)
        d = np.diff(seq)
        gaps += int(np.clip(d - 1, 0, None).sum())
        self.seq_missing += gaps
        self._next_event_seq[vm] = max(int(seq.max()) + 1, expected or 0)

    def _send_part(self, i: int, part: pa.Table, wait: float) -> bool:
        slot = self.slots[i]
        if wait > 0:
            deadline = time.monotonic() + wait
            while slot.sender.pending >= self.queue_size and time.monotonic() < deadline:
                time.sleep(0.0005)
        with self._lock:
            seq = slot.sender.stats()["accepted"]
            ok = slot.sender.send(part)
            slot.pending[seq] = (part.num_rows, not ok)
            while len(slot.pending) > 1_000_000:  # a dead link must not grow this without bound
                old, (rows, dropped) = slot.pending.popitem(last=False)
                if not dropped:
                    slot.missing_rows += rows
                slot.next_echo = max(slot.next_echo, old + 1)
        return ok

    # -- aggregator ---------------------------------------------------------------------------------
    def _aggregate(self) -> None:
        while not self._stop.is_set():
            msg = self.results.recv(timeout=0.1)
            if msg is not None:
                self._on_message(msg)

    def _on_message(self, msg: Message) -> None:
        meta = {k.decode(): v.decode() for k, v in (msg.batch.schema.metadata or {}).items()}
        if "vims.hello" in meta:
            i = int(meta.get("vims.slot", -1))
            if 0 <= i < len(self.slots) and meta.get("vims.gen") == str(self.slots[i].gen):
                self.slots[i].ready = True
            return
        try:
            i, seq, rows = int(meta["vims.slot"]), int(meta["vims.input_seq"]), int(meta["vims.input_rows"])
        except (KeyError, ValueError):
            self.result_errors += 1
            return
        if not 0 <= i < len(self.slots):
            self.result_errors += 1
            return
        slot = self.slots[i]
        with self._lock:
            # Everything sent to this slot before `seq` and not echoed is lost (dropped ones are counted).
            while slot.pending:
                first = next(iter(slot.pending))
                if first > seq:
                    break
                r, dropped = slot.pending.pop(first)
                if first < seq and not dropped:
                    slot.missing_rows += r
            slot.next_echo = max(slot.next_echo, seq + 1)
            if "vims.error" in meta:
                slot.errors += 1
                slot.last_error = meta["vims.error"]
                slot.missing_rows += rows
            else:
                slot.scored_rows += rows
            for b, c in json.loads(meta.get("vims.latency", "{}")).items():
                self.latency[int(b)] = self.latency.get(int(b), 0) + c
        if self.on_result is not None:
            self.on_result(msg.batch, meta)

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every batch handed to the workers has been scored or counted lost."""
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            slot.sender.flush(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            with self._lock:
                left = sum(1 for s in self.slots for _, dropped in s.pending.values() if not dropped)
            if left == 0:
                return True
            time.sleep(0.01)
        return False

    # -- counters -----------------------------------------------------------------------------------
    def counts(self) -> dict[str, Any]:
        """Events seen, scored, dropped and missing, and each worker's health (JSON-able)."""
        with self._lock:
            dropped = sum(s.sender.dropped_rows for s in self.slots)
            missing = self.seq_missing + sum(s.missing_rows for s in self.slots)
            workers = [{"slot": i, "pid": s.process.pid if s.process is not None else None,
                        "alive": bool(s.process is not None and s.process.poll() is None),
                        "generation": s.gen, "restarts": s.restarts, "scored": s.scored_rows,
                        "dropped": s.sender.dropped_rows, "missing": s.missing_rows, "queued": s.sender.pending,
                        "errors": s.errors, "last_error": s.last_error, "exits": list(s.exits[-3:])}
                       for i, s in enumerate(self.slots)]
            return {"seen": self.seen, "scored": sum(s.scored_rows for s in self.slots), "dropped": dropped,
                    "missing": missing, "missing_seq_gaps": self.seq_missing,
                    "restarts": sum(s.restarts for s in self.slots), "workers": workers,
                    "result_gaps": self.results.gaps, "result_errors": self.result_errors}

    def latency_quantiles(self) -> dict[str, float | None]:
        """Event-to-score latency so far (seconds): median and 99th percentile."""
        with self._lock:
            hist = dict(self.latency)
        return {"p50": histogram_quantile(hist, 0.5), "p99": histogram_quantile(hist, 0.99)}


def _by_vm(events: pa.Table, columns: list[str], names: set[str]) -> list[pa.Table]:
    """Columns ``columns`` of a batch (whose columns are ``names``) as one table per VM, its ``vm_id`` in
    the schema metadata, not a column."""
    if "vm_id" not in names:
        return [events.select(columns)]
    vm = events.column("vm_id")
    keep = [c for c in columns if c != "vm_id"]
    if events.num_rows == 1 or pc.all(pc.equal(vm, vm[0])).as_py():
        groups = [(str(vm[0].as_py()), events)]
    else:
        groups = [(str(v), events.filter(pc.equal(vm, v))) for v in pc.unique(vm).to_pylist()]
    return [t.select(keep).replace_schema_metadata({b"vims.vm_id": v.encode()}) for v, t in groups]


def _main(argv: list[str]) -> int:
    if len(argv) != 6 or argv[0] != "worker":
        print("usage: python -m vims.avm.pipeline worker SLOT GEN IN_ENDPOINT OUT_ENDPOINT SPEC_JSON", file=sys.stderr)
        return 2
    spec = WorkerSpec(**json.loads(argv[5]))
    worker_main(int(argv[1]), int(argv[2]), argv[3], argv[4], spec)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
