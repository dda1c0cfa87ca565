"""Benchmark of every detector on ADFA-LD (standard protocol) and the UNM programs.

ADFA-LD: fit on Training, score Validation (normal) and all Attack traces: ROC AUC, detection rate at
1/5/10% false alarms, fit seconds (wall clock), scoring syscalls/s (scoring alone, CPU time of one
single-threaded process). Also the default detector after ``update`` with 30% of the Validation
normal traces, judged on the other 70% and all attacks. UNM: per program, fit on half of the normal
traces (three random halves), test on the other half and the intrusions; mean over the halves.
``stide`` (k=6) is the baseline row of each table; ``dAUC`` is the difference to it in the same run.

    VIMS_DATASETS=/work/shared/datasets .venv/bin/python benchmarks/bench_models.py [--quick] [--json]

``--quick`` leaves out the MLP and the ensemble (the slow fits) and the UNM repeats. Fit times are
given as wall clock and as CPU seconds (the machine is shared; BLAS is kept to one thread).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

# scoring throughput is measured on one core: keep BLAS to one thread before numpy loads it
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from vims.console import out, print_json, to_json
from vims.models._seq import as_flat
from vims.models.calibration import folds
from vims.models.registry import DEFAULT_DETECTOR, make_detector
from vims.paths import datasets_dir
from vims.training.core import select
from vims.training.metrics import auc, dr_at_far, jsonable

ADFA_ROWS: list[tuple[str, str, list[str]]] = [
    ("stide k=6 (baseline)", "stide", []),
    ("stide k=6 lfc20", "stide", ["aggregate=window"]),
    ("ngram KN-6 mean", "ngram", []),
    ("ngram KN-6 window20", "ngram", ["aggregate=window"]),
    ("knn 1-3-gram tfidf", "knn", []),
    ("mlp next-call (20)", "mlp", []),
    ("ensemble ngram+mlp", "ensemble", []),
]
SLOW = {"mlp", "ensemble"}


def _metrics(normal: np.ndarray, attack: np.ndarray) -> dict[str, float]:
    return {"auc": auc(normal, attack), "dr1": dr_at_far(normal, attack, 0.01),
            "dr5": dr_at_far(normal, attack, 0.05), "dr10": dr_at_far(normal, attack, 0.10)}


def adfa(quick: bool, only: set[str] | None = None) -> list[dict[str, Any]]:
    from vims.datasets.adfa import read_adfa_ld

    table = read_adfa_ld(datasets_dir() / "adfa-ld" / "ADFA-LD-dev.zip")
    train = as_flat(select(table, ["train"]))
    val = as_flat(select(table, ["validation"]))
    att = as_flat(select(table, ["attack"]))
    n_calls = len(val.values) + len(att.values)
    rows = []
    for label, name, params in ADFA_ROWS:
        if (quick and name in SLOW) or (only and name not in only and "baseline" not in label):
            continue
        det = make_detector(name, params)
        t0, c0 = time.perf_counter(), time.process_time()
        det.fit(train)
        fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
        # CPU seconds of this process: the machine is shared, and the target is per core
        t0 = time.process_time()
        sn, sa = det.anomaly_score(val), det.anomaly_score(att)
        score_s = time.process_time() - t0
        rows.append({"detector": label, **_metrics(sn, sa), "fit_s": fit_s, "fit_cpu_s": fit_cpu,
                     "calls_per_s": n_calls / score_s})
        r = rows[-1]
        out.print(f"  {label}: AUC {r['auc']:.4f} DR@1/5/10% {r['dr1']:.3f}/{r['dr5']:.3f}/{r['dr10']:.3f} "
                  f"fit {fit_s:.1f} s ({fit_cpu:.1f} s CPU), {r['calls_per_s']:,.0f} calls/s", highlight=False)
    # learning from confirmed normal traces: 30% of Validation normal into the default detector
    name = DEFAULT_DETECTOR
    rng = np.random.default_rng(0)
    chosen = np.zeros(val.n_traces, dtype=bool)
    chosen[rng.choice(val.n_traces, size=int(0.3 * val.n_traces), replace=False)] = True
    updated = [("stide k=6 + update 30% (baseline)", "stide"), ("ngram + update 30%", "ngram"),
               ("knn + update 30%", "knn")]
    if not quick:
        updated.append((f"{name} (default) + update 30%", name))
    for label, det_name in updated:
        if only and det_name not in only and "baseline" not in label:
            continue
        det = make_detector(det_name).fit(train)
        t0 = time.perf_counter()
        det.update(val.take(np.flatnonzero(chosen)))
        upd_s = time.perf_counter() - t0
        sn, sa = det.anomaly_score(val.take(np.flatnonzero(~chosen))), det.anomaly_score(att)
        rows.append({"detector": label, **_metrics(sn, sa), "fit_s": upd_s, "fit_cpu_s": float("nan"),
                     "calls_per_s": float("nan")})
        out.print(f"  {label}: AUC {rows[-1]['auc']:.4f} DR@5% {rows[-1]['dr5']:.3f}", highlight=False)
    return rows


def unm(quick: bool, only: set[str] | None = None) -> list[dict[str, Any]]:
    from vims.datasets.unm import read_unm

    rows = []
    root = datasets_dir() / "unm"
    if not root.is_dir():
        return rows
    variants = [("stide k=6 lfc20 (baseline)", "stide", ["aggregate=window"]),
                ("stide k=6 mean", "stide", []),
                ("ngram KN-6 window20", "ngram", ["aggregate=window"]),
                ("ngram KN-6 mean", "ngram", []),
                ("knn", "knn", [])]
    if not quick:
        variants.append(("mlp window20", "mlp", ["aggregate=window", "min_count=1"]))
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        table = read_unm(folder)
        for program in sorted(set(table.column("program").to_pylist())):
            t = table.filter(np.array([p == program for p in table.column("program").to_pylist()]))
            normal = as_flat(select(t, None, "normal"))
            attack = as_flat(select(t, None, "attack"))
            for label, name, params in variants:
                if only and name not in only and "baseline" not in label:
                    continue
                ms = []
                for seed in range(1 if quick else 3):
                    fit_idx, test_idx = folds(normal.n_traces, 2, random_state=seed)
                    det = make_detector(name, params).fit(normal.take(fit_idx))
                    ms.append(_metrics(det.anomaly_score(normal.take(test_idx)), det.anomaly_score(attack)))
                mean = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
                rows.append({"program": program, "detector": label, **mean,
                             "n_normal": normal.n_traces, "n_attack": attack.n_traces})
    return rows


def _print(title: str, rows: list[dict[str, Any]], group: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    cols = ([group] if group else []) + ["detector", "AUC", "dAUC", "DR@1%", "DR@5%", "DR@10%"]
    if not group:
        cols += ["fit s", "fit CPU s", "calls/s"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("detector", group) else "right")
    base: dict[Any, float] = {}
    for r in rows:
        key = r.get(group) if group else ("update" if "update" in r["detector"] else "")
        if "baseline" in r["detector"]:
            base[key] = r["auc"]
    for r in rows:
        key = r.get(group) if group else ("update" if "update" in r["detector"] else "")
        d = r["auc"] - base.get(key, r["auc"])
        cells = ([r[group]] if group else []) + [r["detector"], f"{r['auc']:.4f}", f"{d:+.4f}",
                                                f"{r['dr1']:.3f}", f"{r['dr5']:.3f}", f"{r['dr10']:.3f}"]
        if not group:
            cps = r["calls_per_s"]
            cpu = r["fit_cpu_s"]
            cells += [f"{r['fit_s']:.1f}", "-" if cpu is None else f"{cpu:.1f}", "-" if cps is None else f"{cps:,.0f}"]
        table.add_row(*cells)
    Console(width=160).print(table)  # wide even when piped to a file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="leave out the slow detectors and repeats")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--only", help="comma-separated detector names to run (baselines always run)")
    ap.add_argument("--json-out", type=Path, help="also write the results as JSON to this file")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    results = jsonable({"adfa": adfa(args.quick, only), "unm": unm(args.quick, only)})
    if args.json_out:
        args.json_out.write_text(to_json(results) + "\n")
    if args.json:
        print_json(results)
        return
    _print("ADFA-LD, standard protocol (fit Training; Validation vs all Attack)", results["adfa"])
    if results["unm"]:
        _print("UNM: fit on half the normal traces, test the other half + intrusions", results["unm"], "program")


if __name__ == "__main__":
    main()
