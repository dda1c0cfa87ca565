"""Sequence plumbing shared by the detectors: flat traces, the call vocabulary, n-gram codes.

Every detector works on a *flat* batch: all traces' calls in one integer array plus the offsets where
each trace starts (the layout of an Arrow list column), so that scoring is a handful of vectorised
numpy passes instead of a Python loop per call.

Calls are encoded through a :class:`Vocab`: anything never seen in training, or too rare to trust, is
pooled into ``0`` (``UNK``), ``1`` is the beginning-of-trace pad (``BOS``) and known syscall numbers
are ``2, 3, ...``. Unseen numbers at scoring time therefore never crash a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from vims.errors import InputError

UNK = 0
BOS = 1
#: Radix of n-gram codes: every code is below it. Odd, so that n-grams too long for an exact
#: uint64 code still hash well under wrapping multiplication.
BASE = 1031


@dataclass(frozen=True)
class Flat:
    """Traces as one array of calls plus offsets (trace ``i`` is ``values[offsets[i]:offsets[i+1]]``).

    >>> f = as_flat([[1, 2, 3], [4]])
    >>> f.values.tolist(), f.offsets.tolist(), f.lengths.tolist()
    ([1, 2, 3, 4], [0, 3, 4], [3, 1])
    """

    values: np.ndarray  # int64
    offsets: np.ndarray  # int64, len n_traces + 1

    @property
    def n_traces(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def trace_index(self) -> np.ndarray:
        """The trace each call belongs to."""
        return np.repeat(np.arange(self.n_traces), self.lengths)

    def take(self, rows: np.ndarray | Sequence[int]) -> Flat:
        """The sub-batch of traces ``rows`` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(rows) == 0:
            return Flat(np.zeros(0, dtype=np.int64), offsets)
        starts = self.offsets[rows]
        # index of every call of every chosen trace, without a Python loop over traces
        idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Flat(self.values[idx], offsets)


def _from_list_array(col: pa.ChunkedArray | pa.Array, where: str) -> Flat:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
        raise InputError(f"column 'syscalls' must be a list of integers, not {col.type}", where=where)
    if col.null_count:
        raise InputError("column 'syscalls' has null traces", where=where)
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)
    values = values[offsets[0]:offsets[-1]]
    offsets = offsets - offsets[0]
    if values.dtype.kind not in "iu":
        raise InputError(f"column 'syscalls' must hold integers, not {values.dtype}", where=where)
    return Flat(values.astype(np.int64, copy=False), offsets)


def as_flat(X: Any, where: str = "X") -> Flat:  # noqa: N803 (scikit-learn naming)
    """Coerce ``X`` to a :class:`Flat` batch.

    ``X`` may be a :class:`Flat`, a trace table (``pa.Table``, ``pa.RecordBatch`` or pandas frame with a
    ``syscalls`` column), or a sequence of integer sequences. Anything else is an
    :class:`~vims.errors.InputError`.

    >>> as_flat(pa.table({"syscalls": [[5, 6], []]})).offsets.tolist()
    [0, 2, 2]
    >>> as_flat(["a b"])
    Traceback (most recent call last):
    ...
    vims.errors.InputError: X: trace 0 is not a sequence of integers
    """
    if isinstance(X, Flat):
        return X
    if isinstance(X, pa.Table | pa.RecordBatch):
        if "syscalls" not in X.column_names:
            raise InputError("a trace table needs a 'syscalls' column", where=where)
        return _from_list_array(X.column("syscalls"), where)
    if hasattr(X, "columns") and hasattr(X, "iloc"):  # pandas frame, without importing pandas
        if "syscalls" not in X.columns:
            raise InputError("a trace table needs a 'syscalls' column", where=where)
        X = list(X["syscalls"])  # noqa: N806
    if isinstance(X, str | bytes) or not hasattr(X, "__len__"):
        raise InputError("expected a sequence of traces or a trace table", where=where)
    arrays = []
    for i, trace in enumerate(X):
        try:
            a = np.asarray(trace)
        except (TypeError, ValueError):
            a = np.asarray([None])
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise InputError(f"trace {i} is not a sequence of integers", where=where)
        arrays.append(a.astype(np.int64, copy=False))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return Flat(values, offsets)


class Vocab:
    """Map syscall numbers to dense codes; rare or unseen numbers share the code ``UNK`` (0).

    ``BOS`` (1) is the beginning-of-trace pad; known numbers get ``2, 3, ...`` in the order they were
    admitted, so codes never change when :meth:`extend` admits new numbers (an update keeps every stored
    n-gram valid). All codes stay below :data:`BASE`, the radix of n-gram codes.

    Parameters
    ----------
    min_count : int
        A number needs this many occurrences before it gets its own code.

    Examples
    --------
    >>> v = Vocab(min_count=2).extend(np.array([5, 5, 3, 3, 9]))
    >>> v.encode(np.array([3, 5, 9, 400, -1])).tolist(), v.size
    ([2, 3, 0, 0, 0], 3)
    >>> v.extend(np.array([9, 7])).encode(np.array([9, 7])).tolist()
    [4, 0]
    """

    def __init__(self, min_count: int = 1) -> None:
        self.min_count = min_count
        self.known = np.zeros(0, dtype=np.int64)  # in code order: known[i] has code i + 2
        self.seen = np.zeros(0, dtype=np.int64)  # every number seen (sorted) and its count
        self.seen_counts = np.zeros(0, dtype=np.int64)
        self._lut = np.zeros(0, dtype=np.int64)

    def extend(self, values: np.ndarray) -> Vocab:
        """Count ``values`` and admit the numbers that now reach ``min_count`` (returns ``self``)."""
        nums, counts = np.unique(np.asarray(values, dtype=np.int64), return_counts=True)
        self.seen, self.seen_counts = merge_counts(self.seen, self.seen_counts, nums, counts.astype(np.int64))
        ready = self.seen[self.seen_counts >= self.min_count]
        new = np.setdiff1d(ready, self.known)  # sorted, so a fit is deterministic
        if len(self.known) + len(new) + 2 > BASE:
            keep = BASE - 2 - len(self.known)  # the rarest of the rest stay pooled
            order = np.argsort(-lookup(self.seen, self.seen_counts, new), kind="stable")[:max(keep, 0)]
            new = np.sort(new[order])
        self.known = np.concatenate([self.known, new])
        hi = int(self.known.max()) + 1 if self.known.size else 0
        if self.known.size and self.known.min() >= 0 and hi <= 1 << 16:
            self._lut = np.zeros(hi, dtype=np.int64)
            self._lut[self.known] = np.arange(2, len(self.known) + 2)
        else:
            self._lut = np.zeros(0, dtype=np.int64)
        return self

    @property
    def size(self) -> int:
        """Number of codes that are calls: ``UNK`` plus the known numbers (``BOS`` excluded)."""
        return len(self.known) + 1

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Codes of ``values``; unknown numbers become ``UNK``."""
        values = np.asarray(values, dtype=np.int64)
        if self._lut.size:
            inside = (values >= 0) & (values < len(self._lut))
            return np.where(inside, self._lut[np.where(inside, values, 0)], UNK)
        if not self.known.size:
            return np.zeros(len(values), dtype=np.int64)
        order = np.argsort(self.known)
        return lookup(self.known[order].astype(np.int64), (order + 2).astype(np.int64), values, UNK)


def pad(codes: np.ndarray, offsets: np.ndarray, width: int, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """Put ``width`` copies of ``bos`` before every trace.

    Returns the padded array and the positions of the real calls in it (in the original order).

    >>> p, at = pad(np.array([7, 8, 9]), np.array([0, 2, 3]), 2, 0)
    >>> p.tolist(), at.tolist()
    ([0, 0, 7, 8, 0, 0, 9], [2, 3, 6])
    """
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    trace = np.repeat(np.arange(n), lengths)
    at = np.arange(len(codes), dtype=np.int64) + width * (trace + 1)
    out = np.full(len(codes) + width * n, bos, dtype=np.int64)
    out[at] = codes
    return out, at


def ngram_codes(seq: np.ndarray, at: np.ndarray, n: int, base: int) -> np.ndarray:
    """The code of the n-gram ending at each position ``at`` of ``seq`` (oldest call most significant).

    Codes are exact while ``base ** n < 2 ** 64`` and a hash (wrapping uint64 arithmetic) beyond.

    >>> ngram_codes(np.array([1, 2, 3]), np.array([1, 2]), 2, 10).tolist()
    [12, 23]
    """
    code = np.zeros(len(at), dtype=np.uint64)
    b = np.uint64(base)
    with np.errstate(over="ignore"):
        for j in range(n - 1, -1, -1):
            code = code * b + seq[at - j].astype(np.uint64)
    return code


def unique_traces(flat: Flat) -> tuple[Flat, np.ndarray]:
    """The distinct traces of ``flat`` (first occurrences, in order) and where each trace went.

    ``distinct.take(inverse)`` gives ``flat`` back. Traces are grouped by length and a 64-bit hash of
    their calls, then compared call by call, so a hash collision only costs a trace kept twice, never a
    trace taken for another. A per-trace score computed on ``distinct`` and indexed by ``inverse`` is
    the score of every trace.

    >>> d, inv = unique_traces(as_flat([[1, 2], [3], [1, 2], [], [3], []]))
    >>> d.n_traces, inv.tolist(), d.take(inv).values.tolist()
    (3, [0, 1, 0, 2, 1, 2], [1, 2, 3, 1, 2, 3])
    """
    n, lengths = flat.n_traces, flat.lengths
    tr = flat.trace_index()
    pos = np.arange(len(flat.values), dtype=np.int64) - flat.offsets[tr]
    with np.errstate(over="ignore"):
        x = (flat.values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ pos.astype(np.uint64)
        x ^= x >> np.uint64(31)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(29)
        csum = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(x, dtype=np.uint64)])
        h = csum[flat.offsets[1:]] - csum[flat.offsets[:-1]]
    order = np.lexsort((np.arange(n), h, lengths))  # groups of equal (length, hash), first trace first
    new = np.r_[True, (lengths[order][1:] != lengths[order][:-1]) | (h[order][1:] != h[order][:-1])]
    rep = np.empty(n, dtype=np.int64)
    rep[order] = order[np.flatnonzero(new)[np.cumsum(new) - 1]]
    # check every call against its representative's: a collision keeps the trace as its own
    differs = flat.values != flat.values[flat.offsets[rep[tr]] + pos]
    rep[np.unique(tr[differs])] = np.unique(tr[differs])
    kept, inverse = np.unique(rep, return_inverse=True)
    return flat.take(kept), inverse.astype(np.int64)


def lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray, default: float | int = 0) -> np.ndarray:
    """``values[i]`` where ``keys[i] == query`` (``keys`` sorted), else ``default``.

    >>> lookup(np.array([2, 5], dtype=np.uint64), np.array([10, 20]), np.array([5, 3], dtype=np.uint64))
    array([20,  0])
    """
    if len(keys) == 0:
        return np.full(len(query), default, dtype=values.dtype)
    idx = np.searchsorted(keys, query)
    idx_c = np.minimum(idx, len(keys) - 1)
    hit = keys[idx_c] == query
    return np.where(hit, values[idx_c], default)


def count_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique codes and how often each occurs."""
    u, c = np.unique(codes, return_counts=True)
    return u, c.astype(np.int64)


def merge_counts(k1: np.ndarray, c1: np.ndarray, k2: np.ndarray, c2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add two sorted count tables.

    >>> merge_counts(np.array([1, 3]), np.array([1, 1]), np.array([3, 4]), np.array([2, 2]))
    (array([1, 3, 4]), array([1, 3, 2]))
    """
    keys = np.concatenate([k1, k2])
    counts = np.concatenate([c1, c2])
    u, inv = np.unique(keys, return_inverse=True)
    return u, np.bincount(inv, weights=counts, minlength=len(u)).astype(np.int64)


def window_max_mean(call: np.ndarray, offsets: np.ndarray, window: int) -> np.ndarray:
    """Per trace, the largest mean of ``call`` over ``window`` consecutive calls.

    A trace shorter than the window gets the mean of the whole trace; an empty trace gets 0.

    >>> window_max_mean(np.array([0., 1., 1., 0., 5.]), np.array([0, 4, 5]), 2).tolist()
    [1.0, 5.0]
    """
    n = len(offsets) - 1
    out = np.zeros(n)
    if len(call) == 0:
        return out
    csum = np.concatenate([[0.0], np.cumsum(call, dtype=np.float64)])
    lengths = np.diff(offsets)
    short = lengths < window
    nz = lengths > 0
    s = short & nz
    out[s] = (csum[offsets[1:][s]] - csum[offsets[:-1][s]]) / lengths[s]
    long_ = ~short
    if long_.any():
        # window sums ending at every position; keep those whose window lies inside one trace
        ends = np.arange(window, len(call) + 1)
        sums = csum[ends] - csum[ends - window]
        trace_of_end = np.searchsorted(offsets, ends - 1, side="right") - 1
        ok = ends - window >= offsets[trace_of_end]
        sel_sums, sel_tr = sums[ok], trace_of_end[ok]
        best = np.full(n, -np.inf)
        if len(sel_tr):
            # ends are sorted, so each trace's windows are one contiguous run
            starts = np.flatnonzero(np.r_[True, sel_tr[1:] != sel_tr[:-1]])
            best[sel_tr[starts]] = np.maximum.reduceat(sel_sums, starts)
        out[long_] = best[long_] / window
    return out


def trace_mean(call: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per trace, the mean of ``call`` (0 for an empty trace).

    >>> trace_mean(np.array([1., 3., 5.]), np.array([0, 2, 2, 3])).tolist()
    [2.0, 0.0, 5.0]
    """
    csum = np.concatenate([[0.0], np.cumsum(call, dtype=np.float64)])
    lengths = np.diff(offsets)
    sums = csum[offsets[1:]] - csum[offsets[:-1]]
    return np.divide(sums, lengths, out=np.zeros(len(lengths)), where=lengths > 0)
