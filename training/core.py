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
from vims.models import as_flat
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


def trace_keys(rows: pa.Table) -> np.ndarray:
    """One 64-bit key per trace: BLAKE2b of its ``trace_id`` and its calls (sorted, unique).

    A key names a trace itself, not only its calls: identical traces under other ids (ADFA-LD's
    Validation holds 422 copies of Training traces, UNM's files many repeats) have other keys. Without
    a ``trace_id`` column the result is empty.
    """
    import hashlib

    if "trace_id" not in rows.column_names:
        return np.empty(0, dtype=np.uint64)
    keys = np.empty(rows.num_rows, dtype=np.uint64)
    for i, (tid, calls) in enumerate(zip(rows.column("trace_id").to_pylist(),
                                         rows.column("syscalls").to_pylist(), strict=True)):
        h = hashlib.blake2b(str(tid).encode() + b"\0", digest_size=8)
        h.update(np.asarray(calls or [], dtype="<i8").tobytes())
        keys[i] = int.from_bytes(h.digest(), "little")
    return keys


def pack_keys(keys: np.ndarray) -> str:
    """Trace keys for a card: sorted unique uint64, little-endian, base64 (11 characters a trace)."""
    import base64

    return base64.b64encode(np.unique(keys).astype("<u8").tobytes()).decode()


def unpack_keys(text: str) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(text), dtype="<u8").astype(np.uint64)


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
            "trace_keys": pack_keys(trace_keys(rows)),
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
           data_path: str | None = None, on_fold: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Add the normal traces of ``table`` to ``det`` and recalibrate; returns the new card.

    ``on_fold`` is called after each update (:func:`~vims.models.calibration.update_steps` of them).
    """
    rows = training_rows(table, split, where=data_path or "data")
    flat = as_flat(rows, where=data_path or "data")
    before = getattr(det, "threshold_", None)
    start = time.perf_counter()
    recalibrate_update(det, flat, cv=cv, on_fold=on_fold)
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": data_path,
        "data_sha256": data_digest(flat),
        "trace_keys": pack_keys(trace_keys(rows)),
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
    new["threshold"] = det.threshold_  # one threshold everywhere: the card's top level is what reports state
    new["metrics"] = {}  # metrics of the old model no longer hold
    return new


def open_model(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """:func:`~vims.models.persist.load_model`, saying what a wrong file is (a card, a table) and what to pass."""
    from vims.models.persist import load_model

    p = Path(path)
    if p.name.endswith(".card.json"):
        raise InputError(f"this is a model card; pass the model file beside it ({p.name[:-10]}.skops)", where=p)
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"PAR1":
            raise InputError("this is a Parquet table (traces or scores), not a model; pass the .skops file "
                             "`vims train` wrote", where=p)
    return load_model(p)


def check_labels(table: pa.Table, where: str = "data") -> None:
    """Refuse a table whose labels are not all ``normal``/``attack``, or that lacks either class."""
    labels = table.column("label").to_pylist() if "label" in table.column_names else []
    other = sorted({str(x) for x in labels} - {"normal", "attack"})
    if other:
        raise InputError(f"labels must be 'normal' or 'attack', found {', '.join(other)}; relabel the traces "
                         "(nothing would count as an attack otherwise)", where=where)
    missing = [c for c in ("normal", "attack") if c not in labels]
    if missing:
        raise InputError(f"no {' and no '.join(missing)} traces to evaluate on: AUC and detection rates "
                         "need both (add the attack split, or the normal one)", where=where)


def fitted_mask(table: pa.Table, card: dict[str, Any], where: str = "data") -> np.ndarray:
    """Which rows of ``table`` are normal traces the model was fitted on (its training or an update).

    The card keeps every fitted trace's key (:func:`trace_keys`: its id and its calls), so a table
    holding some of them among others is found row by row. A card without keys (written before they
    were kept) is matched by the SHA-256 of the trained split's normal traces as a whole.
    """
    mask = np.zeros(table.num_rows, dtype=bool)
    if "label" not in table.column_names or table.num_rows == 0:
        return mask
    normal = np.array([lab == "normal" for lab in table.column("label").to_pylist()], dtype=bool)
    fitted = [card.get("training") or {}, *card.get("updates", [])]  # the traces of `vims update` too
    packed = [t["trace_keys"] for t in fitted if t.get("trace_keys")]
    if packed:
        known = np.unique(np.concatenate([unpack_keys(p) for p in packed]))
        return normal & np.isin(trace_keys(table), known)
    for t in fitted:
        if not t.get("data_sha256"):
            continue
        split = t.get("split")
        in_split = np.ones(table.num_rows, dtype=bool) if split in (None, "all") else \
            np.array([s == split for s in table.column("split").to_pylist()], dtype=bool)
        rows = table.filter(pa.array(normal & in_split))
        if rows.num_rows and data_digest(as_flat(rows, where=where)) == t["data_sha256"]:
            mask |= normal & in_split
    return mask


def training_overlap(table: pa.Table, card: dict[str, Any], where: str = "data") -> int:
    """How many normal traces of ``table`` the model was fitted on (:func:`fitted_mask`)."""
    return int(fitted_mask(table, card, where=where).sum())


def check_evaluable(table: pa.Table, card: dict[str, Any], where: str = "data",
                    fitted: np.ndarray | None = None) -> None:
    """Refuse an evaluation that would mislead: bad labels, one class only, or the model's own training traces.

    ``fitted`` marks those traces where they are already known (a score table's ``fitted`` column);
    else they are found from the card (:func:`fitted_mask`).
    """
    check_labels(table, where=where)
    overlap = training_overlap(table, card, where=where) if fitted is None else int(np.sum(fitted))
    if overlap:
        n = (table.column("label").to_pylist()).count("normal")
        raise InputError(f"{overlap:,} of the {n:,} normal traces to evaluate on are traces the model was fitted "
                         "on (in its training or an update, by the keys its card keeps): the figures would be "
                         "inflated; evaluate on other traces, or pass --exclude-fitted to leave them out",
                         where=where)


def threshold_of(det: Detector) -> float:
    t = getattr(det, "threshold_", None)
    return float(t) if t is not None else -float(det.offset_)


def chosen_threshold(det: Detector, far: float | None = None, threshold: float | None = None) -> float | None:
    """The threshold to flag with: ``threshold``, or the one for false-alarm rate ``far`` on the model's
    out-of-fold calibration scores (no refit), or the calibrated one (None for a model set).
    """
    from vims.models.calibration import threshold_for
    from vims.models.modelset import ModelSet

    if far is not None and threshold is not None:
        raise InputError("give --far or --threshold, not both")
    if isinstance(det, ModelSet):
        if far is not None or threshold is not None:
            raise InputError("a model set has one threshold per program; --far and --threshold need a single model")
        return None
    if threshold is not None:
        return float(threshold)
    if far is not None:
        cal = getattr(det, "calibration_scores_", None)
        if cal is None or len(cal) == 0:
            raise InputError("this model has no calibration scores to choose a threshold for --far from")
        return threshold_for(np.asarray(cal), far)
    return threshold_of(det)


def score_table(det: Detector, table: pa.Table, where: str = "data", threshold: float | None = None,
                card: dict[str, Any] | None = None) -> pa.Table:
    """Score every trace of ``table``: a table in :data:`~vims.schemas.SCORE_SCHEMA`.

    ``anomalous`` is the score above ``threshold`` (default: the model's calibrated one). A model set
    scores each trace with its program's detector and threshold (``program`` column). Given the model's
    ``card``, ``fitted`` says which rows are normal traces it was fitted on (:func:`fitted_mask`), so a
    later evaluation of the score table alone can refuse them; without it ``fitted`` is null.
    """
    from vims.models.modelset import ModelSet

    if isinstance(det, ModelSet):
        scores = det.anomaly_score(table)
        anomalous = det.predict(table) == -1
    else:
        scores = det.anomaly_score(as_flat(table, where=where))
        anomalous = scores > (threshold_of(det) if threshold is None else threshold)
    n = table.num_rows

    def col(name: str) -> pa.Array | list[None]:
        return table.column(name) if name in table.column_names else [None] * n

    trace_id = table.column("trace_id") if "trace_id" in table.column_names else [str(i) for i in range(n)]
    return pa.table(
        {"trace_id": trace_id, "split": col("split"), "label": col("label"), "family": col("family"),
         "program": col("program"), "score": scores, "anomalous": anomalous,
         "fitted": [None] * n if card is None else fitted_mask(table, card, where=where)},
        schema=SCORE_SCHEMA,
    )
