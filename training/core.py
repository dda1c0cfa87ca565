"""From trace tables to fitted, calibrated, evaluated models: the library behind ``vims train``,
``vims score``, ``vims evaluate`` and ``vims update`` (and the notebooks).

>>> import pyarrow as pa
>>> t = pa.table({"trace_id": ["a", "b", "c", "d"], "split": ["train"] * 3 + ["attack"],
...               "label": ["normal"] * 3 + ["attack"],
...               "syscalls": [[1, 2, 3, 4] * 3, [1, 2, 3] * 4, [2, 3, 4] * 4, [4, 3, 2, 1] * 3]})
>>> det, card = train(t, detector="stide", params=["k=3"], cv=3)
>>> card["training"]["n_traces"], card["calibration"]["cv"]
(3, 3)
>>> score_table(det, t).column("anomalous").to_pylist()
[False, False, False, True]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vims.errors import InputError
from vims.models._seq import as_flat
from vims.models.base import Detector
from vims.models.calibration import calibrate, recalibrate_update
from vims.models.persist import data_digest
from vims.models.registry import DEFAULT_DETECTOR, make_detector
from vims.schemas import SCORE_SCHEMA, TRACE_SCHEMA


def load_traces(path: str | Path) -> pa.Table:
    """A trace table from Parquet (``vims datasets import``), or straight from an ADFA-LD zip/folder."""
    from vims.tables import read_table

    p = Path(path)
    if p.suffix == ".zip" or p.is_dir():
        from vims.datasets.adfa import read_adfa_ld

        return read_adfa_ld(p)
    return read_table(p, TRACE_SCHEMA)


def select(table: pa.Table, splits: list[str] | None = None, label: str | None = None) -> pa.Table:
    """Rows whose ``split`` is in ``splits`` (all if None) and whose ``label`` is ``label`` (any if None)."""
    mask = pa.array(np.ones(table.num_rows, dtype=bool))
    if splits:
        mask = pc.and_(mask, pc.fill_null(pc.is_in(table.column("split"), pa.array(splits)), False))
    if label is not None:
        mask = pc.and_(mask, pc.equal(table.column("label"), label))
    return table.filter(mask)


def training_rows(table: pa.Table, split: str | None, where: str = "data") -> pa.Table:
    """The normal traces of ``split`` (every normal trace if ``split`` is None or "all")."""
    rows = select(table, None if split in (None, "all") else [split], "normal")
    if rows.num_rows == 0:
        splits = sorted({s for s in table.column("split").to_pylist() if s is not None}) if \
            "split" in table.column_names else []
        raise InputError(f"no normal traces in split {split!r} (splits present: {', '.join(splits) or 'none'})",
                         where=where)
    return rows


def train(table: pa.Table, detector: str | None = None, params: list[str] | None = None,
          split: str | None = "train", far: float = 0.05, cv: int = 5, data_path: str | None = None,
          on_fold: Callable[[int], Any] | None = None) -> tuple[Detector, dict[str, Any]]:
    """Fit and calibrate a detector on the normal traces of ``split``; return it and its card fields."""
    name = detector or DEFAULT_DETECTOR
    det = make_detector(name, params)
    rows = training_rows(table, split, where=data_path or "data")
    flat = as_flat(rows, where=data_path or "data")
    start = time.perf_counter()
    calibrate(det, flat, far=far, cv=cv, on_fold=on_fold)
    seconds = time.perf_counter() - start
    sources = sorted({s for s in rows.column("source").to_pylist() if s}) if "source" in rows.column_names else []
    card = {
        "training": {
            "data": data_path,
            "data_sha256": data_digest(flat),
            "split": split,
            "sources": sources,
            "n_traces": flat.n_traces,
            "n_calls": len(flat.values),
            "fit_seconds": round(seconds, 3),
        },
        "calibration": {"method": "out-of-fold", "cv": getattr(det, "cv", cv) if name == "ensemble" else cv,
                        "far": far, "threshold": det.threshold_, "n_scores": len(det.calibration_scores_)},
        "metrics": {},
    }
    return det, card


def update(det: Detector, card: dict[str, Any], table: pa.Table, split: str | None = None, cv: int = 3,
           data_path: str | None = None) -> dict[str, Any]:
    """Add the normal traces of ``table`` to ``det`` and recalibrate; returns the new card."""
    rows = training_rows(table, split, where=data_path or "data")
    flat = as_flat(rows, where=data_path or "data")
    before = getattr(det, "threshold_", None)
    start = time.perf_counter()
    recalibrate_update(det, flat, cv=cv)
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": data_path,
        "data_sha256": data_digest(flat),
        "split": split,
        "n_traces": flat.n_traces,
        "n_calls": len(flat.values),
        "seconds": round(time.perf_counter() - start, 3),
        "threshold_before": before,
        "threshold_after": det.threshold_,
    }
    new = dict(card)
    new["updates"] = [*card.get("updates", []), entry]
    new["calibration"] = {**card.get("calibration", {}), "threshold": det.threshold_,
                          "n_scores": len(det.calibration_scores_)}
    new["metrics"] = {}  # metrics of the old model no longer hold
    return new


def threshold_of(det: Detector) -> float:
    t = getattr(det, "threshold_", None)
    return float(t) if t is not None else -float(det.offset_)


def score_table(det: Detector, table: pa.Table, where: str = "data") -> pa.Table:
    """Score every trace of ``table``: a table in :data:`~vims.schemas.SCORE_SCHEMA`.

    A model set scores each trace with its program's detector and threshold (``program`` column).
    """
    from vims.models.modelset import ModelSet

    if isinstance(det, ModelSet):
        scores = det.anomaly_score(table)
        anomalous = det.predict(table) == -1
    else:
        scores = det.anomaly_score(as_flat(table, where=where))
        anomalous = scores > threshold_of(det)
    n = table.num_rows

    def col(name: str) -> pa.Array | list[None]:
        return table.column(name) if name in table.column_names else [None] * n

    trace_id = table.column("trace_id") if "trace_id" in table.column_names else [str(i) for i in range(n)]
    return pa.table(
        {"trace_id": trace_id, "split": col("split"), "label": col("label"), "family": col("family"),
         "program": col("program"), "score": scores, "anomalous": anomalous},
        schema=SCORE_SCHEMA,
    )
