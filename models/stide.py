"""stide (Forrest et al. 1996): a database of the length-``k`` call windows seen in normal traces.

A call is a *mismatch* when the window of ``k`` calls ending at it was never seen in training. The
anomaly score of a trace is its mismatch rate (``aggregate="mean"``) or its locality frame count, the
largest number of mismatches in ``window`` consecutive calls divided by ``window``
(``aggregate="window"``).
"""

from __future__ import annotations

import numpy as np

from vims.errors import InputError
from vims.models._seq import BASE, BOS, Flat, Vocab, ngram_codes, pad
from vims.models.base import CallDetector


class Stide(CallDetector):
    """Window-database detector.

    Parameters
    ----------
    k : int
        Window length.
    aggregate : {"mean", "window"}
        Mismatch rate, or locality frame count over ``window`` calls.
    window : int
        Locality frame length.
    min_count : int
        Syscall numbers seen fewer times in training are pooled into one code.

    Examples
    --------
    >>> det = Stide(k=3).fit([[1, 2, 3, 1, 2, 3, 1, 2, 3]] * 3)
    >>> det.anomaly_score([[1, 2, 3, 1, 2, 3], [1, 2, 3, 3, 2, 1]]).round(2).tolist()
    [0.0, 0.5]
    >>> det.predict([[1, 2, 3], [3, 2, 1]]).tolist()
    [1, -1]
    """

    def __init__(self, k: int = 6, aggregate: str = "mean", window: int = 20, min_count: int = 1) -> None:
        self.k = k
        self.aggregate = aggregate
        self.window = window
        self.min_count = min_count

    def _validate_params_(self) -> None:
        super()._validate_params_()
        if int(self.k) < 1:
            raise InputError(f"k must be at least 1, not {self.k}")

    def _windows(self, flat: Flat) -> np.ndarray:
        seq, at = pad(self.vocab_.encode(flat.values), flat.offsets, self.context_, BOS)
        return ngram_codes(seq, at, int(self.k), BASE)

    def _fit(self, flat: Flat) -> None:
        self.vocab_ = Vocab(int(self.min_count)).extend(flat.values)
        self.context_ = int(self.k) - 1
        self.db_ = np.unique(self._windows(flat))

    def _update(self, flat: Flat) -> None:
        self.vocab_.extend(flat.values)
        self.db_ = np.union1d(self.db_, self._windows(flat))

    def _call_scores(self, seq: np.ndarray, at: np.ndarray) -> np.ndarray:
        codes = ngram_codes(seq, at, int(self.k), BASE)
        idx = np.minimum(np.searchsorted(self.db_, codes), len(self.db_) - 1)
        return (self.db_[idx] != codes).astype(np.float64)
