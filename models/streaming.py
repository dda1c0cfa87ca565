"""Streaming scoring: per-process state, event batches in, current scores out.

The collector delivers system calls as Arrow batches in :data:`vims.schemas.EVENT_SCHEMA` (column
``nr`` is the call). :class:`StreamingScorer` keeps, for every process (key: ``vm_id`` + ``pid``),
only what the model needs to continue: the last ``context_`` calls and the running sums of the
per-call surprises (and the last ``window - 1`` surprises with the best window so far for the windowed
score), so memory per process is constant however long it runs. After all of a process's calls have
arrived its score equals what batch scoring of the same trace gives (up to float rounding).

API (all that the A-VM pipeline needs)::

    scorer = StreamingScorer(model)            # a fitted stide / ngram / mlp, or an ensemble of them
    table = scorer.update(batch)               # -> pa.Table, one row per process seen in this batch
    table = scorer.scores()                    # -> the same for every process known
    scorer.reset(("vm-1", 42))                 # forget one process (it exited); reset() forgets all

Rows are in :data:`STREAM_SCORE_SCHEMA`: ``vm_id``, ``pid``, ``comm``, ``n_calls``, ``score`` (higher =
more anomalous, same scale as :meth:`~vims.models.base.Detector.anomaly_score`) and ``anomalous``
(``score`` above the model's calibrated threshold).

A new program, a new trace: with ``reset_on_exec`` (the default) a process whose ``comm`` changes
(what a successful ``execve`` does; a failed one leaves it) starts over with a fresh state, so a shell
that execs a server is scored as that server from its first call. Models see the raw numbers in
``nr``: a model fitted on ADFA-LD (32-bit x86 numbering) is meaningless on x86-64 guest events;
fit on traces from the same architecture. Whole-trace models (``knn``) cannot stream.

>>> import pyarrow as pa
>>> from vims.models.ngram import NGram
>>> lm = NGram(order=3).fit([[1, 2, 3, 4] * 5] * 3)
>>> s = StreamingScorer(lm)
>>> def events(pid, calls):
...     n = len(calls)
...     return pa.table({"vm_id": ["vm"] * n, "pid": [pid] * n, "comm": ["sh"] * n, "nr": calls})
>>> _ = s.update(events(7, [1, 2, 3]))
>>> row = s.update(events(7, [4, 1])).to_pylist()[0]
>>> row["n_calls"], round(row["score"], 9) == round(float(lm.anomaly_score([[1, 2, 3, 4, 1]])[0]), 9)
(5, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from vims.errors import InputError, VimsError
from vims.models._seq import BOS
from vims.models.base import CallDetector
from vims.models.ensemble import Ensemble
from vims.schemas import STREAM_SCORE_SCHEMA

#: One row per process: its current score. (Candidate for vims/schemas.py.)
Key = tuple[str, int]


@dataclass
class _Channel:
    """Running state of one per-call model for one process."""

    context: np.ndarray  # last context_ codes (BOS-padded at start)
    total: float = 0.0
    n: int = 0
    tail: np.ndarray = field(default_factory=lambda: np.zeros(0))  # last window - 1 surprises
    best: float = -np.inf  # best full-window sum so far


@dataclass
class _Process:
    comm: str | None
    channels: list[_Channel]


class StreamingScorer:
    """Turn event batches into per-process scores with a fitted per-call model.

    Parameters
    ----------
    model : CallDetector or Ensemble of CallDetectors
        A fitted model.
    reset_on_exec : bool
        Start a process over when its ``comm`` changes (a new program after ``execve``).
    """

    def __init__(self, model: Any, reset_on_exec: bool = True) -> None:
        ens = isinstance(model, Ensemble)
        channels = [det for _, det in getattr(model, "members_", [])] if ens else [model]
        if not channels or not all(isinstance(c, CallDetector) for c in channels):
            raise VimsError(f"{type(model).__name__} looks at whole traces and cannot score a stream; "
                            "use stide, ngram, mlp or an ensemble of them")
        for c in channels:
            c._check_fitted()
        self.model = model
        self.reset_on_exec = reset_on_exec
        self._channels: list[CallDetector] = channels
        threshold = getattr(model, "threshold_", None)
        self.threshold = float(threshold) if threshold is not None else -float(model.offset_)
        self._procs: dict[Key, _Process] = {}

    # -- state ----------------------------------------------------------------------------------------
    def _fresh(self, comm: str | None) -> _Process:
        return _Process(comm, [_Channel(np.full(c.context_, BOS, dtype=np.int64)) for c in self._channels])

    def reset(self, key: Key | None = None) -> None:
        """Forget process ``key`` (``(vm_id, pid)``), or every process."""
        if key is None:
            self._procs.clear()
        else:
            self._procs.pop((str(key[0]), int(key[1])), None)

    def __len__(self) -> int:
        return len(self._procs)

    def _score_of(self, proc: _Process) -> float:
        values = []
        for det, ch in zip(self._channels, proc.channels, strict=True):
            if ch.n == 0:
                values.append(0.0)
            elif det.aggregate == "window" and ch.n >= int(det.window):
                values.append(ch.best / int(det.window))
            else:
                values.append(ch.total / ch.n)
        if isinstance(self.model, Ensemble):
            return float(self.model.combine(np.array([values]))[0])
        return values[0]

    def _rows(self, keys: list[Key]) -> pa.Table:
        scores = [self._score_of(self._procs[k]) for k in keys]
        return pa.table(
            {
                "vm_id": [k[0] for k in keys],
                "pid": [k[1] for k in keys],
                "comm": [self._procs[k].comm for k in keys],
                "n_calls": [self._procs[k].channels[0].n for k in keys],
                "score": scores,
                "anomalous": [s > self.threshold for s in scores],
            },
            schema=STREAM_SCORE_SCHEMA,
        )

    def scores(self) -> pa.Table:
        """The current score of every process known."""
        return self._rows(sorted(self._procs))

    # -- events ---------------------------------------------------------------------------------------
    def update(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        """Consume an event batch (``vm_id``, ``pid``, ``nr``; ``comm`` optional); return the processes it touched."""
        missing = [c for c in ("vm_id", "pid", "nr") if c not in batch.column_names]
        if missing:
            raise InputError(f"event batch lacks columns {', '.join(missing)}")
        if batch.num_rows == 0:
            return self._rows([])
        vm = batch.column("vm_id").to_pylist()
        pid = np.asarray(batch.column("pid").to_numpy(zero_copy_only=False), dtype=np.int64)
        nr = np.asarray(batch.column("nr").to_numpy(zero_copy_only=False), dtype=np.int64)
        comm = batch.column("comm").to_pylist() if "comm" in batch.column_names else [None] * len(vm)

        # pieces: runs of one process's events in arrival order, split where its comm changes
        groups: dict[Key, list[int]] = {}
        for i, key in enumerate(zip(vm, pid.tolist(), strict=True)):
            groups.setdefault(key, []).append(i)
        pieces: list[tuple[Key, np.ndarray, str | None, bool]] = []
        for key, rows in groups.items():
            idx = np.asarray(rows)
            cs = [comm[i] for i in rows]
            proc = self._procs.get(key)
            last = proc.comm if proc is not None else None
            start, fresh = 0, proc is None
            for j in range(len(idx) + 1):
                change = j < len(idx) and self.reset_on_exec and cs[j] is not None and last is not None \
                    and cs[j] != last
                if j == len(idx) or change:
                    if j > start:
                        pieces.append((key, idx[start:j], cs[j - 1], fresh))
                    start, fresh = j, True
                if j < len(idx) and cs[j] is not None:
                    last = cs[j]
        for c_i, det in enumerate(self._channels):
            self._advance(c_i, det, pieces, nr)
        return self._rows(list(groups))

    def _advance(self, c_i: int, det: CallDetector, pieces: list[tuple[Key, np.ndarray, str | None, bool]],
                 nr: np.ndarray) -> None:
        ctx = det.context_
        seqs, ats, states = [], [], []
        offset = 0
        for key, idx, comm, fresh in pieces:
            if c_i == 0:
                if fresh or key not in self._procs:
                    self._procs[key] = self._fresh(comm)
                elif comm is not None:
                    self._procs[key].comm = comm
            ch = self._procs[key].channels[c_i]
            codes = det.vocab_.encode(nr[idx])
            seqs.append(np.concatenate([ch.context, codes]))
            ats.append(offset + ctx + np.arange(len(codes)))
            offset += ctx + len(codes)
            states.append(ch)
        seq = np.concatenate(seqs)
        call = det._call_scores(seq, np.concatenate(ats))
        pos = 0
        window = int(det.window)
        for s, ch in zip(seqs, states, strict=True):
            n_new = len(s) - ctx
            new = call[pos:pos + n_new]
            pos += n_new
            ch.context = s[len(s) - ctx:] if ctx else s[:0]
            ch.total += float(new.sum())
            ch.n += n_new
            if det.aggregate == "window":
                run = np.concatenate([ch.tail, new])
                if len(run) >= window:
                    csum = np.concatenate([[0.0], np.cumsum(run)])
                    ch.best = max(ch.best, float(np.max(csum[window:] - csum[:-window])))
                ch.tail = run[max(0, len(run) - (window - 1)):] if window > 1 else run[:0]
