"""The tiny abstract base of every detector (the scikit-learn outlier-detector API).

- :class:`Detector`: ``fit(X)``, ``score_samples(X)`` (higher = more normal), ``decision_function(X)``
  (``score_samples(X) - offset_``: negative = anomalous), ``predict(X)`` (+1 normal, -1 anomalous),
  ``anomaly_score(X)`` (``-score_samples``: higher = more anomalous, what reports show) and
  ``update(X)`` (learn from more normal traces without refitting from scratch).
- :class:`CallDetector`: a detector that gives every call a *surprise* from the calls before it
  (a window mismatch, a negative log-likelihood) and sums those up per trace, either as the mean over
  the trace or as the largest mean over ``window`` consecutive calls (the local score: an attack
  hidden in a long normal trace still stands out). Its public streaming contract (in the spirit of
  River's ``score_one``): :meth:`CallDetector.init_state` gives a fresh :class:`CallState` for a new
  stream of calls (a process), :meth:`CallDetector.score_calls` the surprises of the stream's next calls
  (advancing the state), :meth:`CallDetector.score_streams` the same for many streams in one vectorised
  pass. Any cutting of a stream into pieces gives the surprises batch scoring gives.

``X`` is a sequence of integer sequences or a trace table (see :func:`vims.models._seq.as_flat`).
``offset_`` is set at fit time from the training scores at ``far``, an optimistic guess; calibration
(:func:`vims.models.calibration.calibrate`) replaces it with one from out-of-fold scores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from vims.errors import InputError, VimsError
from vims.models._seq import BOS, Flat, Vocab, as_flat, pad, trace_mean, window_max_mean

AGGREGATES = ("mean", "window")


class Detector(BaseEstimator, ABC):
    """Base of every detector; subclasses implement ``_fit``, ``_score`` and optionally ``_update``."""

    #: Default false-alarm rate of the threshold set at fit time.
    far: float = 0.05

    def fit(self, X: Any, y: Any = None) -> Detector:  # noqa: N803 (scikit-learn naming)
        """Fit on normal traces ``X`` (``y`` is ignored)."""
        flat = as_flat(X)
        if flat.n_traces == 0:
            raise InputError("cannot fit a detector on zero traces")
        self._validate_params_()
        self._fit(flat)
        self.offset_ = float(np.quantile(-self._score(flat), self.far))
        self.n_traces_seen_ = flat.n_traces
        self.n_calls_seen_ = len(flat.values)
        return self

    def update(self, X: Any) -> Detector:  # noqa: N803 (scikit-learn naming)
        """Learn from more normal traces ``X`` without refitting from scratch (``offset_`` is kept)."""
        self._check_fitted()
        flat = as_flat(X)
        self._update(flat)
        self.n_traces_seen_ += flat.n_traces
        self.n_calls_seen_ += len(flat.values)
        return self

    def score_samples(self, X: Any) -> np.ndarray:  # noqa: N803 (scikit-learn naming)
        """Normality of each trace: higher is more normal."""
        self._check_fitted()
        return -self._score(as_flat(X))

    def anomaly_score(self, X: Any) -> np.ndarray:  # noqa: N803 (scikit-learn naming)
        """Anomaly of each trace: higher is more anomalous (``-score_samples``)."""
        self._check_fitted()
        return self._score(as_flat(X))

    def decision_function(self, X: Any) -> np.ndarray:  # noqa: N803 (scikit-learn naming)
        """``score_samples(X) - offset_``: negative means anomalous."""
        return self.score_samples(X) - self.offset_

    def predict(self, X: Any) -> np.ndarray:  # noqa: N803 (scikit-learn naming)
        """+1 for normal traces, -1 for anomalous ones."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    @property
    def anomaly_threshold(self) -> float:
        """The anomaly score above which a trace is anomalous: ``-offset_`` (``threshold_`` once calibrated)."""
        self._check_fitted()
        return float(-self.offset_)

    def _check_fitted(self) -> None:
        if not hasattr(self, "offset_"):
            raise VimsError(f"this {type(self).__name__} is not fitted yet: call fit first")

    def _validate_params_(self) -> None:
        """Check parameters at the edge (subclasses extend)."""

    @abstractmethod
    def _fit(self, flat: Flat) -> None: ...

    @abstractmethod
    def _score(self, flat: Flat) -> np.ndarray: ...

    def _update(self, flat: Flat) -> None:
        raise VimsError(f"{type(self).__name__} cannot be updated; refit it instead")


@dataclass
class CallState:
    """What a :class:`CallDetector` remembers of one stream of calls between two :meth:`~CallDetector.score_calls`.

    Attributes
    ----------
    context : numpy.ndarray
        The codes of the stream's last ``context_`` calls (``BOS`` pads before its first calls).
    """

    context: np.ndarray


class CallDetector(Detector):
    """A detector built from per-call surprises given the previous ``context_`` calls.

    Subclasses set ``vocab_`` and ``context_`` in ``_fit`` and implement :meth:`_call_scores`; the
    streaming contract (:meth:`init_state`, :meth:`score_calls`, :meth:`score_streams`) is built on it
    for every subclass. Parameters ``aggregate`` (``"mean"`` or ``"window"``) and ``window`` say how
    the surprises of a trace become its anomaly score.

    Examples
    --------
    Streaming a trace in pieces gives the surprises of the whole trace:

    >>> from vims.models.stide import Stide
    >>> det = Stide(k=2).fit([[1, 2, 1, 2, 1, 2]])
    >>> state = det.init_state()
    >>> det.score_calls(state, [1, 2, 2]).tolist(), det.score_calls(state, [2, 1]).tolist()
    ([0.0, 0.0, 1.0], [1.0, 0.0])
    >>> det.call_scores([[1, 2, 2, 2, 1]]).values.tolist()
    [0.0, 0.0, 1.0, 1.0, 0.0]
    """

    aggregate: str = "mean"
    window: int = 20
    vocab_: Vocab
    context_: int

    def _validate_params_(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise InputError(f"aggregate must be one of {', '.join(AGGREGATES)}, not {self.aggregate!r}")
        if int(self.window) < 1:
            raise InputError(f"window must be at least 1, not {self.window}")

    @abstractmethod
    def _call_scores(self, seq: np.ndarray, at: np.ndarray) -> np.ndarray:
        """Surprise of the call at each position ``at`` of the encoded ``seq``.

        Every position has at least ``context_`` calls (or ``BOS`` pads) before it.
        """

    def init_state(self) -> CallState:
        """A fresh state for a new stream of calls (a process that starts): nothing seen yet."""
        self._check_fitted()
        return CallState(np.full(int(self.context_), BOS, dtype=np.int64))

    def score_calls(self, state: CallState, calls: Any) -> np.ndarray:
        """Surprises of a stream's next ``calls`` (system call numbers), given what ``state`` saw.

        Parameters
        ----------
        state : CallState
            The stream's state (from :meth:`init_state`); advanced past ``calls``.
        calls : array-like of int
            The calls, in order.

        Returns
        -------
        numpy.ndarray
            One surprise (float) per call: higher is more surprising.
        """
        calls = np.asarray(calls, dtype=np.int64)
        return self.score_streams([state], calls, np.array([len(calls)]))

    def score_streams(self, states: Sequence[CallState], calls: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """:meth:`score_calls` for many streams at once, in one vectorised pass.

        Parameters
        ----------
        states : sequence of CallState
            One state per stream, each advanced past its calls.
        calls : numpy.ndarray of int
            The streams' next calls laid end to end: ``lengths[0]`` calls of ``states[0]``, then
            ``lengths[1]`` of ``states[1]``, ...
        lengths : numpy.ndarray of int
            Calls per stream.

        Returns
        -------
        numpy.ndarray
            The surprise of every call, in the layout of ``calls``.
        """
        self._check_fitted()
        lengths = np.asarray(lengths, dtype=np.int64)
        if not lengths.sum():
            return np.zeros(0)
        c, n = int(self.context_), len(states)
        # each stream's context then its calls, laid end to end
        padded_start = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1] + c, out=padded_start[1:])
        first = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1], out=first[1:])
        at = np.repeat(padded_start + c - first, lengths) + np.arange(int(lengths.sum()))
        seq = np.empty(int(lengths.sum()) + c * n, dtype=np.int64)
        seq[at] = self.vocab_.encode(calls)
        if c:
            seq[padded_start[:, None] + np.arange(c)] = np.stack([s.context for s in states])
            new_ctx = seq[(padded_start + lengths)[:, None] + np.arange(c)]
            for k, s in enumerate(states):
                s.context = new_ctx[k]
        return self._call_scores(seq, at)

    def call_scores(self, X: Any) -> Flat:  # noqa: N803 (scikit-learn naming)
        """Per-call surprises of every trace, as a :class:`Flat` of floats."""
        self._check_fitted()
        flat = as_flat(X)
        return Flat(self._flat_call_scores(flat), flat.offsets)

    def _flat_call_scores(self, flat: Flat) -> np.ndarray:
        codes = self.vocab_.encode(flat.values)
        seq, at = pad(codes, flat.offsets, self.context_, BOS)
        return self._call_scores(seq, at)

    def aggregate_calls(self, call: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Turn per-call surprises into one anomaly score per trace."""
        if self.aggregate == "window":
            return window_max_mean(call, offsets, int(self.window))
        return trace_mean(call, offsets)

    def _score(self, flat: Flat) -> np.ndarray:
        return self.aggregate_calls(self._flat_call_scores(flat), flat.offsets)
