"""An n-gram language model of system calls with interpolated Kneser-Ney smoothing.

The surprise of a call is its negative log-likelihood (nats) given the ``order - 1`` calls before it.
A trace's anomaly is the mean surprise (``aggregate="mean"``) or the largest mean over ``window``
consecutive calls (``aggregate="window"``, the local score that UNM-style traces, where an intrusion is a
short burst inside a long normal process, need).

The model keeps raw n-gram counts of every order and derives its smoothed tables from them, so
:meth:`NGram.update` just adds the counts of new traces (no refit).
"""

from __future__ import annotations

import numpy as np

from vims.errors import InputError
from vims.models._seq import (
    BASE,
    BOS,
    Flat,
    Vocab,
    count_codes,
    lookup,
    merge_counts,
    ngram_codes,
    pad,
)
from vims.models.base import CallDetector

#: Longest n-gram whose code is exact in 64 bits (``BASE ** n < 2 ** 64``).
MAX_ORDER = int(np.floor(64 / np.log2(BASE)))


class NGram(CallDetector):
    """Interpolated Kneser-Ney n-gram model; anomaly = mean (or windowed) negative log-likelihood.

    Parameters
    ----------
    order : int
        n of the n-grams (1 to :data:`MAX_ORDER`).
    aggregate : {"mean", "window"}
        Mean surprise over the trace, or the largest mean over ``window`` calls.
    window : int
        Window of the local score.
    min_count : int
        Syscall numbers seen fewer times in training are pooled into one code.

    Examples
    --------
    >>> normal = [[1, 2, 3, 4] * 5] * 4
    >>> lm = NGram(order=3).fit(normal)
    >>> a, b = lm.anomaly_score([[1, 2, 3, 4] * 3, [1, 2, 4, 3] * 3])
    >>> bool(a < b)
    True
    >>> lm.predict([[4, 3, 2, 1] * 3]).tolist()
    [-1]
    """

    def __init__(self, order: int = 6, aggregate: str = "mean", window: int = 20, min_count: int = 1) -> None:
        self.order = order
        self.aggregate = aggregate
        self.window = window
        self.min_count = min_count

    def _validate_params_(self) -> None:
        super()._validate_params_()
        if not 1 <= int(self.order) <= MAX_ORDER:
            raise InputError(f"order must be between 1 and {MAX_ORDER}, not {self.order}")

    # -- counting -------------------------------------------------------------------------------------
    def _count(self, flat: Flat) -> list[tuple[np.ndarray, np.ndarray]]:
        seq, at = pad(self.vocab_.encode(flat.values), flat.offsets, self.context_, BOS)
        return [count_codes(ngram_codes(seq, at, m, BASE)) for m in range(1, int(self.order) + 1)]

    def _fit(self, flat: Flat) -> None:
        self.vocab_ = Vocab(int(self.min_count)).extend(flat.values)
        self.context_ = int(self.order) - 1
        counts = self._count(flat)
        self.keys_ = [k for k, _ in counts]
        self.counts_ = [c for _, c in counts]
        self._build()

    def _update(self, flat: Flat) -> None:
        self.vocab_.extend(flat.values)
        for m, (k, c) in enumerate(self._count(flat)):
            self.keys_[m], self.counts_[m] = merge_counts(self.keys_[m], self.counts_[m], k, c)
        self._build()

    def _build(self) -> None:
        """Derive the smoothed tables (one per order) from the raw counts."""
        n = int(self.order)
        base = np.uint64(BASE)
        # the count each order uses: raw for the top order, continuation counts N1+(. x) below it
        used: list[tuple[np.ndarray, np.ndarray]] = [None] * n  # type: ignore[list-item]
        used[n - 1] = (self.keys_[n - 1], self.counts_[n - 1].astype(np.float64))
        for m in range(n - 1, 0, -1):  # order m (index m - 1) from the distinct (m + 1)-grams
            suffix = self.keys_[m] % (base ** np.uint64(m))
            k, c = count_codes(suffix)
            used[m - 1] = (k, c.astype(np.float64))
        # per order: sorted keys, discounted counts max(c - D, 0), and for the next order's contexts
        # (keyed by the same codes) a = 1 / c(h) and the back-off weight g = D * N1+(h .) / c(h).
        # Every value array ends with a sentinel (count 0, a 0, g 1) that a missing key (-1) reads.
        self.tables_: list[dict[str, np.ndarray]] = []
        self.discounts_ = np.zeros(n)
        for m in range(n):
            k, c = used[m]
            n1, n2 = np.sum(c == 1), np.sum(c == 2)
            self.discounts_[m] = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.5
        for m in range(n):
            k, c = used[m]
            keys = k
            if m + 1 < n:
                nk, nc = used[m + 1]
                ctx, inv = np.unique(nk // base, return_inverse=True)
                keys = np.union1d(k, ctx)
            table = {"keys": keys,
                     "dc": np.append(np.maximum(lookup(k, c, keys, 0.0) - self.discounts_[m], 0.0), 0.0)}
            if m + 1 < n:
                csum = lookup(ctx, np.bincount(inv, weights=nc, minlength=len(ctx)), keys, 0.0)
                ctypes = lookup(ctx, np.bincount(inv, minlength=len(ctx)).astype(np.float64), keys, 0.0)
                seen = csum > 0
                safe = np.where(seen, csum, 1.0)
                table["a"] = np.append(np.where(seen, 1.0 / safe, 0.0), 0.0)
                table["g"] = np.append(np.where(seen, self.discounts_[m + 1] * ctypes / safe, 1.0), 1.0)
            self.tables_.append(table)
        c1 = used[0][1]
        self.uni_total_ = float(c1.sum())
        self.uni_types_ = float(np.count_nonzero(c1))

    # -- scoring --------------------------------------------------------------------------------------
    def _call_scores(self, seq: np.ndarray, at: np.ndarray) -> np.ndarray:
        n = int(self.order)
        base = np.uint64(BASE)
        padded = np.concatenate([np.full(n, BOS), seq]).astype(np.uint64)
        pos = at + n  # where the calls sit in padded
        code = padded  # codes of the m-grams ending at every position, built one order at a time
        p = np.zeros(len(at))
        prev_rows: np.ndarray | None = None
        with np.errstate(over="ignore"):
            for m in range(n):
                if m:
                    nxt = np.empty_like(code)
                    nxt[0] = padded[0]
                    np.multiply(code[:-1], base, out=nxt[1:])
                    nxt[1:] += padded[1:]
                    code = nxt
                t = self.tables_[m]
                keys = t["keys"]
                idx = np.searchsorted(keys, code)
                np.minimum(idx, len(keys) - 1, out=idx)
                rows = np.where(keys[idx] == code, idx, -1)
                dc = t["dc"][rows[pos]]
                if m == 0:
                    p = (dc + self.discounts_[0] * self.uni_types_ / self.vocab_.size) / self.uni_total_
                else:
                    assert prev_rows is not None
                    tp = self.tables_[m - 1]
                    h = prev_rows[pos - 1]
                    p = dc * tp["a"][h] + tp["g"][h] * p
                prev_rows = rows
        return -np.log(np.maximum(p, 1e-300))
