"""Fit a per-program model set from a capture's trace table (what ``vims train --per-program`` runs).

Every program with at least ``min_traces`` distinct normal traces gets its own detector (copies of one
run say nothing of how a program varies: a model calibrated on them flags every run that differs a
little); all normal traces together fit the fallback, which scores every other program. Each detector
is calibrated out of fold twice over: its trace threshold (``threshold_``, as
:func:`vims.models.calibration.calibrate` does) and its *window threshold*, the ``1 - far`` quantile of
the windows of held-out normal traces (the mean surprise over ``window`` consecutive calls, one window
per call): the threshold the A-VM pipeline applies to every window (:mod:`vims.avm.report`), so about
``far`` of normal windows lie above it.
That threshold is raised to the *process floor* where that is higher (:func:`process_floor`): the
threshold at which at most ``far`` of the held-out normal traces, judged as the A-VM judges a process
(more than half of its windows above: anomalous), look anomalous. A program whose normal runs vary
more than its windows show (UNM's ``login``) would otherwise keep the whole VM near a false cut. A
program the fallback scores gets a floor of its own, from its held-out traces under the fallback (key
``"*:NAME"`` in the model set's window thresholds) where that is above the fallback's threshold.
Where the traces name their parent's program (VIMS captures), the model set also keeps which programs
started which (:func:`~vims.models.modelset.lineage_of`; the card lists under ``lineage`` the programs
that started nothing).

>>> import pyarrow as pa
>>> t = pa.table({"program": ["a"] * 6 + ["b"] * 4, "label": ["normal"] * 10,
...               "syscalls": [[1, 2, 3] * (2 + i) for i in range(6)] + [[4, 5, 4, 5]] * 4})
>>> ms, card = fit_model_set(t, detector="stide", params=["k=2"], min_traces=3, cv=3)
>>> sorted(ms.programs()), card["programs"]["a"]["n_traces"], ms.window_threshold("a")
(['*', 'a'], 6, 0.0)
>>> card["programs"]["b"]  # four copies of one run: the fallback scores b
{'n_traces': 4, 'n_distinct': 1, 'model': '*'}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from vims.errors import InputError
from vims.models import Flat, as_flat
from vims.models._seq import unique_traces

#: Detector of a model set unless told otherwise: a per-call model the pipeline can stream. On the
#: guest's short captures stide's window thresholds collapse to 0 (any unseen 6-gram is "rare") and
#: normal intervals raised false alarms; a smoothed 4-gram model grades novelty instead.
DEFAULT_DETECTOR = "ngram"
DEFAULT_PARAMS = ["order=4"]
#: The VM threshold the A-VM applies by default (``vims avm run --threshold``): the process floor of
#: each window threshold is calibrated for it.
VM_THRESHOLD = 0.5


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


def process_needs(windows: np.ndarray, offsets: np.ndarray, vm_threshold: float = VM_THRESHOLD) -> np.ndarray:
    """Per trace, the lowest window threshold at which it stays a normal process (NaN for an empty trace).

    The A-VM judges a process by ``1 - above / windows`` against the VM threshold (default 0.5: more
    than half of its windows above the window threshold is anomalous, :mod:`vims.avm.report`). A
    trace of ``n`` windows may have ``floor(vm_threshold * n)`` above: it needs the threshold at its
    window of that rank from the top.

    >>> process_needs(np.array([0.1, 0.2, 0.9, 0.3, 0.3, 0.3]), np.array([0, 3, 6, 6])).tolist()
    [0.2, 0.3, nan]
    """
    lengths = np.diff(offsets)
    order = np.lexsort((windows, np.repeat(np.arange(len(lengths)), lengths)))
    ranked = windows[order]  # each trace's windows in ascending order, traces one after the other
    above = np.floor(vm_threshold * lengths).astype(np.int64)
    out = np.full(len(lengths), np.nan)
    keep = lengths > 0
    out[keep] = ranked[(offsets[:-1] + lengths - above - 1)[keep]]
    return out


def process_floor(needs: np.ndarray, far: float) -> float | None:
    """The ``1 - far`` quantile of :func:`process_needs`: at most ``far`` of those processes look anomalous."""
    from vims.models.calibration import threshold_for

    needs = needs[~np.isnan(needs)]
    return threshold_for(needs, far) if len(needs) else None


def _calibrated(detector: Any, flat: Flat, far: float, cv: int,
                random_state: int) -> tuple[Any, float | None, np.ndarray]:
    """``detector`` fitted on ``flat`` with its trace threshold; its window quantile and process needs.

    Both come from held-out traces (out of fold): the window quantile is the ``1 - far`` quantile of
    their windows, the needs (:func:`process_needs`) one per trace of ``flat`` (NaN: not a per-call
    detector, or an empty trace).
    """
    from sklearn.base import clone

    from vims.models.base import CallDetector
    from vims.models.calibration import folds, set_threshold, threshold_for

    trace_scores = np.empty(flat.n_traces)
    needs = np.full(flat.n_traces, np.nan)
    windows: list[np.ndarray] = []
    for held in folds(flat.n_traces, cv, random_state):
        rest = np.setdiff1d(np.arange(flat.n_traces), held)
        model = clone(detector).fit(flat.take(rest))
        part = flat.take(held)
        trace_scores[held] = model.anomaly_score(part)
        if isinstance(model, CallDetector):
            calls = model.call_scores(part)
            windows.append(window_means(calls.values, calls.offsets, int(model.window)))
            needs[held] = process_needs(windows[-1], calls.offsets)
    detector.fit(flat)
    set_threshold(detector, trace_scores, far)
    values = np.concatenate(windows) if windows else np.zeros(0)
    return detector, (threshold_for(values, far) if len(values) else None), needs


def _window_threshold(quantile: float | None, floor: float | None) -> float | None:
    """The window quantile raised to the process floor (None when neither is known)."""
    known = [v for v in (quantile, floor) if v is not None]
    return max(known) if known else None


def fit_model_set(table: pa.Table, detector: str | None = None, params: list[str] | None = None,
                  min_traces: int = 5, far: float = 0.05, cv: int = 3, random_state: int = 0,
                  on_program: Callable[[str], Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Fit a :class:`~vims.models.modelset.ModelSet` on the normal traces of ``table``.

    ``table`` needs ``syscalls`` and ``program`` (and ``label``: only ``normal`` rows are used).
    Returns the model set and its card fields (programs, traces, thresholds).
    """
    from vims.models.modelset import FALLBACK, FALLBACK_PREFIX, ModelSet, lineage_of
    from vims.models.persist import data_digest
    from vims.models.registry import make_detector
    from vims.training.core import pack_keys, trace_keys

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
        part = flat.take(rows)
        distinct = unique_traces(part)[0].n_traces
        if distinct < max(min_traces, cv):  # copies of one run say nothing of how the program varies
            if len(rows) >= max(min_traces, cv):
                card_programs[program] = {"n_traces": len(rows), "n_distinct": distinct, "model": FALLBACK}
            continue
        if on_program is not None:
            on_program(program)
        det, quantile, needs = _calibrated(make_detector(name, params), part, far, cv, random_state)
        floor = process_floor(needs, far)
        wthr = _window_threshold(quantile, floor)
        models[program] = det
        if wthr is not None:
            thresholds[program] = wthr
        card_programs[program] = {"n_traces": len(rows), "n_distinct": distinct, "n_calls": len(part.values),
                                  "threshold": float(det.threshold_), "window_threshold": wthr,
                                  "process_floor": floor, "window_quantile": quantile}
    if on_program is not None:
        on_program(FALLBACK)
    fallback, quantile, needs = _calibrated(make_detector(name, params), flat, far, cv, random_state)
    floor = process_floor(needs, far)
    wthr = _window_threshold(quantile, floor)
    if wthr is not None:
        thresholds[FALLBACK] = wthr
    # a program the fallback scores gets its own floor, from its own held-out traces under the fallback
    for program, rows in sorted(by_program.items()):
        own = process_floor(needs[rows], far) if program not in models and len(rows) >= cv else None
        if own is not None and wthr is not None and own > wthr:
            thresholds[FALLBACK_PREFIX + program] = own
            card_programs.setdefault(program, {"n_traces": len(rows), "model": FALLBACK})
            card_programs[program]["window_threshold"] = own
    card_programs[FALLBACK] = {"n_traces": flat.n_traces, "n_calls": len(flat.values),
                               "threshold": float(fallback.threshold_), "window_threshold": wthr,
                               "process_floor": floor, "window_quantile": quantile}
    lineage = lineage_of(table)
    model_set = ModelSet(models, fallback, thresholds, lineage=lineage)
    card = {
        "kind": "model-set",
        "threshold": float(fallback.threshold_),
        "far": far,
        "training": {"data_sha256": data_digest(flat), "trace_keys": pack_keys(trace_keys(table)),
                     "n_traces": flat.n_traces, "n_calls": len(flat.values),
                     "detector": name, "params": list(params or []), "min_traces": min_traces,
                     "fit_seconds": round(time.perf_counter() - start, 3)},
        "calibration": {"method": "out-of-fold", "cv": cv, "far": far},
        "programs": card_programs,
        "lineage": None if lineage is None else {
            "min_calls": model_set.lineage_min_calls,
            "start_nothing": model_set.starting_nothing(),
            "starts": sum(sum(v["children"].values()) for v in lineage.values())},
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
