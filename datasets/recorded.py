"""A recording of the Debian guest (``vims datasets record``) read back as one labelled trace table.

The layout (``docs/datasets.md``): ``OUT/manifest.json`` lists the runs; each run is a folder
``OUT/<run-id>/`` with ``events.parquet`` (``EVENT_SCHEMA``), ``truth.json`` (a list of ground truths,
empty for a normal run) and ``run.json`` (how it was recorded). :func:`read_recording` cuts every
run's events into traces (:func:`~vims.datasets.capture.traces_from_events`, trace ids carrying the
run id), labels them with the run's truths and gives them splits by run (:func:`run_splits`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from vims.datasets.capture import traces_from_events
from vims.datasets.traces import trace_table
from vims.datasets.truth import read_truths
from vims.errors import InputError
from vims.jsonfile import read_json

__all__ = ["EVENTS", "FORMAT", "MANIFEST", "RUN", "TRUTH", "is_recording", "read_manifest", "read_recording",
           "run_splits"]

MANIFEST, EVENTS, TRUTH, RUN = "manifest.json", "events.parquet", "truth.json", "run.json"
#: ``manifest.json``'s ``format``.
FORMAT = "vims-recording"


def is_recording(path: Path) -> bool:
    """Whether ``path`` is a recorded folder (it holds ``manifest.json``)."""
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    """``folder``'s manifest, checked for the fields the importer uses."""
    path = folder / MANIFEST
    manifest = read_json(path, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"not a VIMS recording (its 'format' is not {FORMAT!r})", where=path)
    runs = manifest.get("runs")
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("run_id"), str)
                                             and r.get("kind") in ("normal", "attack") for r in runs):
        raise InputError("field 'runs' must be a list of {run_id, kind: normal|attack, ...}", where=path)
    return manifest


def run_splits(runs: list[dict[str, Any]]) -> dict[str, str]:
    """The split of every run: ``attack`` for attack runs; normal runs by run, in run-id order.

    A long normal run (``long: true``, from ``--hours``) is ``validation`` (the held-out time) and every
    short normal run then ``train``; otherwise the first half of the short runs (at least one) is
    ``train`` and the rest ``validation``.

    >>> run_splits([{"run_id": "normal-1", "kind": "normal"}, {"run_id": "normal-0", "kind": "normal"},
    ...             {"run_id": "attack-x", "kind": "attack"}])
    {'attack-x': 'attack', 'normal-0': 'train', 'normal-1': 'validation'}
    """
    splits = {r["run_id"]: "attack" for r in runs if r["kind"] == "attack"}
    short = sorted(r["run_id"] for r in runs if r["kind"] == "normal" and not r.get("long"))
    long = sorted(r["run_id"] for r in runs if r["kind"] == "normal" and r.get("long"))
    n_train = len(short) if long else max(1, (len(short) + 1) // 2)
    splits.update({run: "train" if i < n_train else "validation" for i, run in enumerate(short)})
    splits.update({run: "validation" for run in long})
    return dict(sorted(splits.items()))


def read_recording(folder: Path, include_failed: bool = False) -> tuple[pa.Table, dict[str, Any]]:
    """Every run of a recorded ``folder`` as one trace table, and what was read (runs, skipped runs).

    Runs marked failed are left out unless ``include_failed`` (their events stop where the run did).
    """
    from vims.schemas import EVENT_SCHEMA
    from vims.tables import read_table

    manifest = read_manifest(folder)
    runs = [r for r in manifest["runs"] if include_failed or r.get("status") == "ok"]
    skipped = [{"run_id": r["run_id"], "status": r.get("status"), "reason": r.get("reason")}
               for r in manifest["runs"] if r not in runs]
    if not runs:
        raise InputError(f"no run to import ({len(skipped)} failed or unfinished)", where=folder / MANIFEST)
    splits = run_splits(runs)
    tables = []
    for run in runs:
        run_dir = folder / run["run_id"]
        truths = read_truths([run_dir / TRUTH])
        if run["kind"] == "attack" and not truths:
            raise InputError("an attack run with no ground truth", where=run_dir / TRUTH)
        events = read_table(run_dir / EVENTS, EVENT_SCHEMA)
        tables.append(traces_from_events(events, split=splits[run["run_id"]], truths=truths,
                                         capture=run["run_id"], where=str(run_dir / EVENTS)))
    table = pa.concat_tables(tables) if tables else trace_table([])
    return table, {"runs": [r["run_id"] for r in runs], "splits": splits, "skipped_runs": skipped}
