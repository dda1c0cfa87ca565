"""Benchmark: the behaviour models judged where they run, on the Debian guest's own recorded data.

    .venv/bin/python benchmarks/bench_detection.py [--name GUEST] [--hours H] [--tracer gdb|plugin] [--quick] [--json]

The data is a recording (:mod:`vims.collector.guest.recording`, cached under ``~/.cache/vims``): normal
runs of the small-server workload and one run per attack scenario, each attack at a seeded moment of
the workload, with its ground truth. A recording in the cache needs no guest; else, without ``--name``,
a Debian guest is booted for it (``Guest.start`` through ``running_guest``) and stopped at the end.
Two views, each for the default detector and for stide (the baseline) in the same run:

- **per trace**: ROC AUC and detection at 1% and 5% false alarms, held-out normal traces against each
  attack family's traces. Every choice made on training data (the models, their window thresholds) uses
  normal traces only, so every family is left out of every choice: the figures are leave-one-family-out;
- **per reporting interval, as REM-S acts**: the held-out normal runs and every attack run replayed
  through the A-VM's pipeline (:func:`vims.avm.replay.replay`, reports cut by recorded time at the
  default policy's interval), each report judged by the policy's behaviour threshold: false cuts per
  hour of normal workload, and for each attack whether and how many seconds after its start it is cut.

Targets (issue 14): 0 false cuts per hour and every attack cut within two intervals of its start.
``--hours`` adds one long normal run (recorded once, then cached) so the false-cut rate is measured
on at least that much normal time; without it, the rate comes from the short held-out runs and says
how many seconds it rests on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np


def _knobs(args: argparse.Namespace) -> Any:
    import dataclasses

    from vims.collector.guest.recording import SMALL_KNOBS, standard_knobs

    knobs = SMALL_KNOBS if args.quick else standard_knobs(args.hours)
    return dataclasses.replace(knobs, tracer=args.tracer)


def _models(table: Any) -> dict[str, Any]:
    """The default per-program model set and stide's, fitted on the train split's normal traces."""
    import pyarrow.compute as pc

    from vims.training.per_program import fit_model_set

    train = table.filter(pc.and_(pc.equal(table["split"], "train"), pc.equal(table["label"], "normal")))
    models = {}
    for name, detector in (("default", None), ("stide", "stide")):
        t0 = time.perf_counter()
        models[name], _card = fit_model_set(train, detector=detector, min_traces=10)
        print(f"fitted {name} on {train.num_rows} traces in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return models


def _per_trace(table: Any, models: dict[str, Any]) -> dict[str, Any]:
    """AUC and detection rates per attack family, held-out normal traces as the normal side."""
    import pyarrow.compute as pc

    from vims.training.metrics import detection_metrics, grouped_metrics

    held = table.filter(pc.not_equal(table["split"], "train"))
    is_attack = np.asarray(held["label"].to_pylist()) == "attack"
    families = held["family"].to_pylist()
    out = {}
    for name, model in models.items():
        scores = np.asarray(model.anomaly_score(held), dtype=float)
        out[name] = {"all": detection_metrics(scores, is_attack),
                     "families": grouped_metrics(scores, is_attack, families, per_group_normals=False)}
    return out


def _replay_run(model: Any, events: Any, interval_s: float) -> list[tuple[int, float | None]]:
    """Each report of ``events`` replayed at ``interval_s``: (end of its interval in ns, behaviour score)."""
    from vims.avm.replay import replay_reports

    return [(end, r["behaviour"]["score"]) for end, r in replay_reports(model, events, interval_s, vm_id="bench")]


def _per_interval(folder: Any, read: dict[str, Any], models: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    """False cuts per hour on the held-out normal runs; each attack's time to its first cut."""
    from vims.datasets.truth import read_truths
    from vims.schemas import EVENT_SCHEMA
    from vims.tables import read_table

    threshold, interval = float(policy["threshold"]), float(policy["interval_s"])
    out: dict[str, Any] = {}
    for name, model in models.items():
        normal = {"seconds": 0.0, "reports": 0, "cuts": 0, "unscored": 0}
        attacks = {}
        for run_id, split in read["splits"].items():
            if split == "train":
                continue
            events = read_table(folder / run_id / "events.parquet", EVENT_SCHEMA).sort_by("ts_ns")
            reports = _replay_run(model, events, interval)
            cut = [(end, s) for end, s in reports if s is not None and s < threshold]
            if split == "validation":
                normal["seconds"] += len(reports) * interval
                normal["reports"] += len(reports)
                normal["cuts"] += len(cut)
                normal["unscored"] += sum(s is None for _, s in reports)
                continue
            truth = read_truths([folder / run_id / "truth.json"])[0]
            after = [end for end, _ in cut if end > truth.started_ns]
            attacks[truth.scenario] = {
                "family": truth.family, "cut": bool(after),
                "seconds_to_cut": round((after[0] - truth.started_ns) / 1e9, 2) if after else None,
                "intervals_to_cut": int(np.ceil((after[0] - truth.started_ns) / 1e9 / interval)) if after else None,
                "min_score": min((s for _, s in reports if s is not None), default=None),
            }
        hours = normal["seconds"] / 3600.0
        normal["false_cuts_per_hour"] = round(normal["cuts"] / hours, 1) if hours else None
        out[name] = {"normal": normal, "attacks": attacks}
    return out


def _print(result: dict[str, Any]) -> None:
    print(f"recording {result['recording']} ({result['traces']} traces; held-out normal "
          f"{result['per_interval']['default']['normal']['seconds']:.0f} s)")
    print(f"\nper trace (every family left out of every choice): {'':<8}AUC     DR@1%   DR@5%")
    for name, r in result["per_trace"].items():
        rows = {"all attacks": r["all"], **r["families"]}
        for family, m in rows.items():
            print(f"  {name:<8} {family:<28} {m['auc']:>6.3f}  {m['dr']['1%']:>6.3f}  {m['dr']['5%']:>6.3f}")
    print(f"\nper interval (policy: interval {result['policy']['interval_s']:g} s, threshold "
          f"{result['policy']['threshold']:g}):")
    for name, r in result["per_interval"].items():
        n = r["normal"]
        print(f"  {name:<8} false cuts {n['cuts']} in {n['reports']} normal intervals = "
              f"{n['false_cuts_per_hour']}/h (target 0); unscored intervals {n['unscored']}")
        for scenario, a in r["attacks"].items():
            when = f"cut after {a['seconds_to_cut']} s ({a['intervals_to_cut']} intervals)" if a["cut"] else "not cut"
            print(f"  {name:<8}   {scenario:<22} {when} (target: within 2 intervals)")


def _progress(knobs: Any) -> Any:
    """A line on stderr as each run of the recording starts (the recorder reports twice a second)."""
    runs = knobs.runs()
    seen: set[str] = set()

    def show(spec: Any, index: int, _p: dict[str, Any]) -> None:
        if spec.run_id not in seen:
            seen.add(spec.run_id)
            print(f"recording run {len(seen)} of {len(runs)}: {spec.run_id} ({spec.seconds:g} s)", file=sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="a running Debian guest (`vims guest up`); default: boot one")
    parser.add_argument("--hours", type=float, default=None, help="add one long normal run of this many hours")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run on a small recording (2 normal runs of 25 s, 1 attack)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--tracer", choices=("gdb", "plugin"), default="gdb",
                        help="what traces the recording: gdb (the watchpoint tracer; it misses calls under "
                        "load) or plugin (QEMU 10's TCG plugin: every call)")
    args = parser.parse_args(argv)

    from vims.collector.guest.recording import cached_recording, scenarios_from_attacks
    from vims.datasets.recorded import read_recording
    from vims.remote.policy import DEFAULT_POLICY

    knobs = _knobs(args)
    folder = cached_recording(knobs, args.name or f"bench-detection-{os.getpid()}",
                              scenarios_from_attacks(knobs.scenarios), progress=_progress(knobs),
                              log=lambda m: print(m, file=sys.stderr))
    table, read = read_recording(folder)
    models = _models(table)
    result = {"recording": str(folder), "traces": table.num_rows, "policy": {
        k: DEFAULT_POLICY[k] for k in ("interval_s", "threshold")},
        "per_trace": _per_trace(table, models),
        "per_interval": _per_interval(folder, read, models, DEFAULT_POLICY)}
    if args.json:
        from vims.training.metrics import jsonable

        print(json.dumps(jsonable(result), indent=2))
    else:
        _print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
