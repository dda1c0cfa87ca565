"""Thresholds for a target false-alarm rate, from out-of-fold scores of normal traces.

Scores of the traces a model was fitted on are optimistic (it has seen them), so a threshold taken
from them gives far more false alarms than promised. :func:`calibrate` splits the normal traces in
``cv`` folds, fits a copy on all folds but one and scores the one left out; the threshold is the
``1 - far`` quantile of those out-of-fold anomaly scores, and the model is then fitted on everything.
:func:`recalibrate_update` does the same for traces added by :meth:`~vims.models.base.Detector.update`.

A calibrated detector has ``threshold_`` (anomaly score above which a trace is anomalous), ``far_``,
``calibration_scores_`` (the out-of-fold normal scores) and ``offset_ = -threshold_``, so that
``decision_function`` is negative exactly above the threshold.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from vims.errors import InputError
from vims.models._seq import Flat, as_flat
from vims.models.base import Detector


def folds(n: int, cv: int, random_state: int = 0) -> list[np.ndarray]:
    """``cv`` disjoint, shuffled folds of ``range(n)``.

    >>> [len(f) for f in folds(10, 3)]
    [4, 3, 3]
    """
    if cv < 2 or n < cv:
        raise InputError(f"need at least {max(cv, 2)} traces and cv >= 2 for out-of-fold scores (have {n})")
    order = np.random.default_rng(random_state).permutation(n)
    return [np.sort(f) for f in np.array_split(order, cv)]


def oof_scores(detector: Detector, X: Any, cv: int = 5, random_state: int = 0,  # noqa: N803
               on_fold: Callable[[int], Any] | None = None) -> np.ndarray:
    """Out-of-fold anomaly scores of the traces ``X`` (each scored by a copy not fitted on it)."""
    from sklearn.base import clone

    flat = as_flat(X)
    out = np.empty(flat.n_traces)
    parts = folds(flat.n_traces, cv, random_state)
    for i, held in enumerate(parts):
        rest = np.setdiff1d(np.arange(flat.n_traces), held)
        model = clone(detector).fit(flat.take(rest))
        out[held] = model.anomaly_score(flat.take(held))
        if on_fold is not None:
            on_fold(i)
    return out


def threshold_for(normal_scores: np.ndarray, far: float) -> float:
    """The anomaly score above which a fraction ``far`` of normal traces lies.

    >>> threshold_for(np.arange(100.0), 0.05)
    94.05
    """
    if not 0 < far < 1:
        raise InputError(f"the target false-alarm rate must be between 0 and 1, not {far}")
    return float(np.quantile(np.asarray(normal_scores, dtype=float), 1 - far))


def set_threshold(detector: Detector, normal_scores: np.ndarray, far: float) -> Detector:
    """Store the calibration of ``detector`` from out-of-fold ``normal_scores``."""
    detector.calibration_scores_ = np.asarray(normal_scores, dtype=float)
    detector.far_ = float(far)
    detector.threshold_ = threshold_for(normal_scores, far)
    detector.offset_ = -detector.threshold_
    return detector


def calibrate(detector: Detector, X: Any, far: float = 0.05, cv: int = 5, random_state: int = 0,  # noqa: N803
              on_fold: Callable[[int], Any] | None = None) -> Detector:
    """Fit ``detector`` on the normal traces ``X`` and set its threshold for false-alarm rate ``far``.

    A detector that computes out-of-fold scores while fitting (the ensemble, ``oof_anomaly_``) is
    fitted once; any other is fitted ``cv`` more times.

    Examples
    --------
    >>> from vims.models.stide import Stide
    >>> normal = [[1, 2, 3, 4] * 4, [1, 2, 3] * 5, [2, 3, 4] * 5, [1, 2, 3, 4, 2, 3] * 3] * 3
    >>> det = calibrate(Stide(k=3), normal, far=0.1, cv=3)
    >>> det.far_, det.predict([[1, 2, 3, 4] * 3, [4, 3, 2, 1] * 3]).tolist()
    (0.1, [1, -1])
    """
    flat = as_flat(X)
    detector.fit(flat)
    scores = getattr(detector, "oof_anomaly_", None)
    if scores is None:
        scores = oof_scores(detector, flat, cv=cv, random_state=random_state, on_fold=on_fold)
    return set_threshold(detector, scores, far)


def update_steps(n_traces: int, cv: int) -> int:
    """How many updates :func:`recalibrate_update` makes: one per fold, then the full one.

    >>> update_steps(100, 3), update_steps(100, 0), update_steps(2, 3)
    (4, 1, 1)
    """
    return cv + 1 if cv and n_traces >= max(cv, 2) else 1


def recalibrate_update(detector: Detector, X: Any, cv: int = 3, random_state: int = 0,  # noqa: N803 (scikit-learn naming)
                       on_fold: Callable[[int], Any] | None = None) -> Detector:
    """Update ``detector`` with the normal traces ``X`` and recalibrate its threshold.

    The new traces get out-of-fold scores (a copy updated on the other folds scores each fold); the
    threshold is then taken over the old calibration scores plus these, at the same ``far_``.
    With ``cv=0`` the new traces are scored by the updated model itself (fast, optimistic).
    ``on_fold(i)`` is called after each of the :func:`update_steps` updates (the last is the full one).
    """
    flat: Flat = as_flat(X)
    if flat.n_traces == 0:
        raise InputError("no traces to update the model with")
    far = float(getattr(detector, "far_", detector.far))
    old = np.asarray(getattr(detector, "calibration_scores_", np.zeros(0)))
    if cv and flat.n_traces >= max(cv, 2):
        new = np.empty(flat.n_traces)
        for i, held in enumerate(folds(flat.n_traces, cv, random_state)):
            rest = np.setdiff1d(np.arange(flat.n_traces), held)
            model = copy.deepcopy(detector).update(flat.take(rest))
            new[held] = model.anomaly_score(flat.take(held))
            if on_fold is not None:
                on_fold(i)
        detector.update(flat)
    else:
        detector.update(flat)
        new = detector.anomaly_score(flat)
    if on_fold is not None:
        on_fold(update_steps(flat.n_traces, cv) - 1)
    return set_threshold(detector, np.concatenate([old, new]), far)
