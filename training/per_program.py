"""Fit a per-program model set from a capture's trace table (what ``vims train --per-program`` runs).

Every program with at least ``min_traces`` normal traces gets its own detector; all normal traces
together fit the fallback, which scores every other program. Each detector is calibrated out of fold
twice over: its trace threshold (``threshold_``, as :func:`vims.models.calibration.calibrate` does) and
its *window threshold*, the ``1 - far`` quantile of the windows of held-out normal traces (the mean
surprise over ``window`` consecutive calls, one window per call): the threshold the A-VM pipeline
applies to every window (:mod:`vims.avm.report`), so about ``far`` of normal windows lie above it.

>>> import pyarrow as pa
>>> t = pa.table({"program": ["a"] * 6 + ["b"] * 2, "label": ["normal"] * 8,
...               "syscalls": [[1, 2, 3, 1, 2, 3]] * 6 + [[4, 5, 4, 5]] * 2})
>>> ms, card = fit_model_set(t, detector="stide", params=["k=2"], min_traces=3, cv=3)
>>> sorted(ms.programs()), card["programs"]["a"]["n_traces"], ms.window_threshold("a")
(['*', 'a'], 6, 0.0)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from vims.errors import InputError
from vims.models import Flat, as_flat

#: Detector of a model set unless told otherwise: a per-call model the pipeline can stream. On the
#: guest's short captures stide's window thresholds collapse to 0 (any unseen 6-gram is "rare") and
#: normal intervals raised false alarms; a smoothed 4-gram model grades novelty instead.
DEFAULT_DETECTOR = "ngram"
DEFAULT_PARAMS = ["order=4"]


def window_means(call: np.ndarray, offsets: np.ndarray, window: int) -> np.ndarray:
    """The mean of ``call`` over the last ``window`` values of its trace (fewer at a trace's start).

    >>> window_means(np.array([1., 0., 1., 1.]), np.array([0, 3, 4]), 2).tolist()
    [1.0, 0.5, 0.5, 1.0]
    """
    n = len(call)
    if n == 0:
        return np.zeros(0)
    csum = np.concatenate([[0.0], np.cumsum(call, dtype=np.float64)])
    trace_start = np.repeat(offsets[:-1], np.diff(offsets))
    pos = np.arange(n)
    start = np.maximum(trace_start, pos - window + 1)
    return (csum[pos + 1] - csum[start]) / (pos + 1 - start)


def _calibrated(detector: Any, flat: Flat, far: float, cv: int, random_state: int) -> tuple[Any, float | None]:
    """``detector`` fitted on ``flat`` with its trace threshold, and its window threshold (out of fold)."""
    from sklearn.base import clone

    from vims.models.base import CallDetector
    from vims.models.calibration import folds, set_threshold, threshold_for

    trace_scores = np.empty(flat.n_traces)
    windows: list[np.ndarray] = []
    for held in folds(flat.n_traces, cv, random_state):
        rest = np.setdiff1d(np.arange(flat.n_traces), held)
        model = clone(detector).fit(flat.take(rest))
        part = flat.take(held)
        trace_scores[held] = model.anomaly_score(part)
        if isinstance(model, CallDetector):
            calls = model.call_scores(part)
            windows.append(window_means(calls.values, calls.offsets, int(model.window)))
    detector.fit(flat)
    set_threshold(detector, trace_scores, far)
    values = np.concatenate(windows) if windows else np.zeros(0)
    return detector, (threshold_for(values, far) if len(values) else None)


def fit_model_set(table: pa.Table, detector: str | None = None, params: list[str] | None = None,
                  min_traces: int = 5, far: float = 0.05, cv: int = 3, random_state: int = 0,
                  on_program: Callable[[str], Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Fit a :class:`~vims.models.modelset.ModelSet` on the normal traces of ``table``.

    ``table`` needs ``syscalls`` and ``program`` (and ``label``: only ``normal`` rows are used).
    Returns the model set and its card fields (programs, traces, thresholds).
    """
    from vims.models.modelset import FALLBACK, ModelSet
    from vims.models.persist import data_digest
    from vims.models.registry import make_detector

    if "program" not in table.column_names:
        raise InputError("a per-program model set needs a 'program' column in the trace table")
    if "label" in table.column_names:
        table = table.filter(pa.compute.equal(table.column("label"), "normal"))
    if table.num_rows < max(cv, 2):
        raise InputError(f"need at least {max(cv, 2)} normal traces to fit a model set, have {table.num_rows}")
    name = detector or DEFAULT_DETECTOR
    if detector is None and params is None:
        params = list(DEFAULT_PARAMS)
    flat = as_flat(table, where="traces")
    programs = table.column("program").to_pylist()
    by_program: dict[str, list[int]] = {}
    for i, p in enumerate(programs):
        if p is not None:
            by_program.setdefault(p, []).append(i)
    start = time.perf_counter()
    models: dict[str, Any] = {}
    thresholds: dict[str, float] = {}
    card_programs: dict[str, Any] = {}
    for program, rows in sorted(by_program.items()):
        if len(rows) < max(min_traces, cv):
            continue
        if on_program is not None:
            on_program(program)
        part = flat.take(rows)
        det, wthr = _calibrated(make_detector(name, params), part, far, cv, random_state)
        models[program] = det
        if wthr is not None:
            thresholds[program] = wthr
        card_programs[program] = {"n_traces": len(rows), "n_calls": len(part.values),
                                  "threshold": float(det.threshold_), "window_threshold": wthr}
    if on_program is not None:
        on_program(FALLBACK)
    fallback, wthr = _calibrated(make_detector(name, params), flat, far, cv, random_state)
    if wthr is not None:
        thresholds[FALLBACK] = wthr
    card_programs[FALLBACK] = {"n_traces": flat.n_traces, "n_calls": len(flat.values),
                               "threshold": float(fallback.threshold_), "window_threshold": wthr}
    model_set = ModelSet(models, fallback, thresholds)
    card = {
        "kind": "model-set",
        "threshold": float(fallback.threshold_),
        "far": far,
        "training": {"data_sha256": data_digest(flat), "n_traces": flat.n_traces, "n_calls": len(flat.values),
                     "detector": name, "params": list(params or []), "min_traces": min_traces,
                     "fit_seconds": round(time.perf_counter() - start, 3)},
        "calibration": {"method": "out-of-fold", "cv": cv, "far": far},
        "programs": card_programs,
    }
    return model_set, card


def train_per_program(table: pa.Table, detector: str | None = None, params: list[str] | None = None,
                      split: str | None = None, far: float = 0.05, cv: int = 3, min_traces: int = 5,
                      data_path: str | None = None,
                      on_program: Callable[[str], Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """``vims train --per-program``: the normal traces of ``split`` (None or ``all``: every split) into
    a model set and its card (save both with :func:`vims.models.persist.save_model`)."""
    from vims.training.core import training_rows

    rows = training_rows(table, split, where=data_path or "data")
    model_set, card = fit_model_set(rows, detector, params, min_traces=min_traces, far=far, cv=cv,
                                    on_program=on_program)
    card["training"].update({"data": data_path, "split": split})
    return model_set, card
