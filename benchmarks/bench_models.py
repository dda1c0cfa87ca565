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

End to end (``score_speed`` in ``--json``): ``vims score`` as a user runs it, a new process with its
start-up, model loading and Parquet reading included, on ADFA-LD Validation, for the default detector
and for stide (the baseline, the fastest detector), each fitted on Training above: median of 3 runs,
calls per wall-clock second and per CPU second (``calls_per_s``, ``calls_per_cpu_s``), and
``vs_baseline``: the default's wall time over stide's in the same run. ``--quick`` runs stide only.

``--select`` instead runs the selection of the default detector's settings (about 5 minutes), which
never looks at Validation: 3-fold out-of-fold scores of the Training traces (normal) against the attack
traces (each scored by the three fold models), criterion ROC AUC + detection at 5% false alarms. The
procedure is factorised to keep the number of choices small: (1) the MLP's context and width, by the
criterion of a lone MLP averaged over two seeds; (2) given that MLP, the members (any of ngram,
ngram window-50 as a blend with ngram, knn, stide; one or two MLP seeds) and the normalisation (rank or
median/IQR). It is run once per held-out attack family (selected on the other three, checked on the
held-out one, next to the previous default ngram + mlp) and once on all four families: that last pick
is the default. Members are normalised on the outer out-of-fold scores here (the ensemble itself uses
inner folds), the same for every candidate.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# scoring throughput is measured on one core: keep BLAS to one thread before numpy loads it
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from vims.console import out, print_json, to_json
from vims.models import as_flat
from vims.models.calibration import folds
from vims.models.registry import DEFAULT_DETECTOR, make_detector
from vims.paths import datasets_dir
from vims.training.core import select
from vims.training.metrics import auc, dr_at_far, jsonable

#: `vims score` end to end runs as a user runs it: without this benchmark's one-thread BLAS setting.
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}

ADFA_ROWS: list[tuple[str, str, list[str]]] = [
    ("stide k=6 (baseline)", "stide", []),
    ("stide k=6 lfc20", "stide", ["aggregate=window"]),
    ("ngram KN-6 mean", "ngram", []),
    ("ngram KN-6 window20", "ngram", ["aggregate=window"]),
    ("knn 1-3-gram tfidf", "knn", []),
    ("mlp next-call (20)", "mlp", []),
    ("ensemble (default: knn+2 mlp c10, rank)", "ensemble", []),
]
SLOW = {"mlp", "ensemble"}


def _metrics(normal: np.ndarray, attack: np.ndarray) -> dict[str, float]:
    return {"auc": auc(normal, attack), "dr1": dr_at_far(normal, attack, 0.01),
            "dr5": dr_at_far(normal, attack, 0.05), "dr10": dr_at_far(normal, attack, 0.10)}


def adfa(quick: bool, only: set[str] | None = None,
         fitted: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The standard-protocol rows; the default detector and the stide baseline go to ``fitted`` too."""
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
        if fitted is not None and (params, name) in (([], "stide"), ([], DEFAULT_DETECTOR)):
            fitted[name] = det
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


def score_speed(fitted: dict[str, Any], runs: int = 3) -> list[dict[str, Any]]:
    """``vims score`` end to end on ADFA-LD Validation for each fitted model (see the module docstring)."""
    from vims.datasets.adfa import read_adfa_ld
    from vims.models.persist import save_model
    from vims.tables import write_table

    val = select(read_adfa_ld(datasets_dir() / "adfa-ld" / "ADFA-LD-dev.zip"), ["validation"])
    n_calls = len(as_flat(val).values)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        write_table(val, Path(tmp) / "validation.parquet")
        for name in sorted(fitted, key=lambda k: k != "stide"):
            save_model(fitted[name], Path(tmp) / f"{name}.skops", {})
            cmd = [sys.executable, "-c", "import sys; from vims.cli import main; sys.argv[0] = 'vims'; main()",
                   "score", "--model", str(Path(tmp) / f"{name}.skops"), "--data",
                   str(Path(tmp) / "validation.parquet"), "-o", str(Path(tmp) / f"{name}.scores.parquet")]
            walls, cpus = [], []
            for _ in range(runs):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=USER_ENV, capture_output=True)
                walls.append(time.perf_counter() - t0)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            wall, cpu = float(np.median(walls)), float(np.median(cpus))
            label = "stide k=6 (baseline)" if name == "stide" else f"{name} (default)"
            rows.append({"detector": label, "calls": n_calls, "runs": runs, "wall_s": wall, "cpu_s": cpu,
                         "calls_per_s": n_calls / wall, "calls_per_cpu_s": n_calls / cpu,
                         "vs_baseline": wall / rows[0]["wall_s"] if rows else 1.0})
            r = rows[-1]
            out.print(f"  vims score {label}: {wall:.2f} s wall ({cpu:.2f} s CPU) for {n_calls:,} calls: "
                      f"{r['calls_per_s']:,.0f} calls/s end to end, {r['vs_baseline']:.2f}x the baseline's time",
                      highlight=False)
    return rows


# -- selection of the default (never looks at Validation) ----------------------------------------------
SELECT_MLPS: dict[str, list[str]] = {
    "c20 h96": ["context=20", "hidden=96"], "c20 h48": ["context=20", "hidden=48"],
    "c20 h192": ["context=20", "hidden=192"], "c10 h96": ["context=10", "hidden=96"],
    "c30 h96": ["context=30", "hidden=96"],
}
SELECT_OTHERS: dict[str, tuple[str, list[str]]] = {
    "ngram": ("ngram", []), "ngram-win50": ("ngram", ["aggregate=window", "window=50"]),
    "knn": ("knn", []), "stide": ("stide", []),
}


def _cv_scores(train: Any, att: Any, name: str, params: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """3-fold out-of-fold Training scores and the attacks' scores by each fold model (folds x attacks)."""
    normal, attack = np.empty(train.n_traces), []
    for held in folds(train.n_traces, 3, random_state=0):
        det = make_detector(name, params).fit(train.take(np.setdiff1d(np.arange(train.n_traces), held)))
        normal[held] = det.anomaly_score(train.take(held))
        attack.append(det.anomaly_score(att))
    return normal, np.stack(attack)


def _normalise(kind: str, n: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What :class:`~vims.models.ensemble.Ensemble` does with ``normalise=kind`` (outer folds here)."""
    q75, q25 = np.quantile(n, [0.75, 0.25])
    scale = (q75 - q25) or 1.0
    if kind == "iqr":
        med = np.median(n)
        return (n - med) / scale, (a - med) / scale
    ref = np.sort(n)

    def rank(x: np.ndarray) -> np.ndarray:
        return np.searchsorted(ref, x, side="right") / len(ref) + np.maximum(x - ref[-1], 0.0) / scale

    return rank(n), rank(a)


def select_default() -> dict[str, Any]:
    """Leave-one-family-out selection of the default ensemble (see the module docstring)."""
    from vims.datasets.adfa import read_adfa_ld

    table = read_adfa_ld(datasets_dir() / "adfa-ld" / "ADFA-LD-dev.zip")
    train = as_flat(select(table, ["train"]))
    att_table = select(table, ["attack"])
    att = as_flat(att_table)
    fam = np.array(att_table.column("family").to_pylist())
    families = sorted(set(fam))
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, (name, params) in SELECT_OTHERS.items():
        scores[key] = _cv_scores(train, att, name, params)
    for cfg, params in SELECT_MLPS.items():
        for seed in (0, 1):
            t0 = time.process_time()
            scores[f"mlp {cfg} s{seed}"] = _cv_scores(train, att, "mlp", [*params, f"random_state={seed}"])
            out.print(f"  mlp {cfg} seed {seed}: {time.process_time() - t0:.0f} s CPU", highlight=False)

    def crit(members: tuple[str, ...], kind: str, fams: list[str]) -> tuple[float, float, float]:
        ns, as_ = zip(*[_normalise(kind, *scores[m]) for m in members], strict=True)
        n, a = np.mean(ns, axis=0), np.mean(as_, axis=0)[:, np.isin(fam, fams)].ravel()
        a_, d = auc(n, a), dr_at_far(n, a, 0.05)
        return a_ + d, a_, d

    def candidates(cfg: str) -> list[tuple[str, ...]]:
        out_ = []
        for r in range(len(SELECT_OTHERS) + 1):
            for others in itertools.combinations(SELECT_OTHERS, r):
                if "ngram-win50" in others and "ngram" not in others:
                    continue  # the window score only as a blend with the mean
                out_.append(others)
                out_ += [(*others, *(f"mlp {cfg} s{s}" for s in range(k))) for k in (1, 2)]
        return [c for c in out_ if c]

    def procedure(fams: list[str]) -> dict[str, Any]:
        mlp_crit = {cfg: float(np.mean([crit((f"mlp {cfg} s{s}",), "iqr", fams)[0] for s in (0, 1)]))
                    for cfg in SELECT_MLPS}
        cfg = max(mlp_crit, key=lambda c: mlp_crit[c])
        grid = [(m, k) for m in candidates(cfg) for k in ("rank", "iqr")]
        best = max(grid, key=lambda mk: crit(mk[0], mk[1], fams)[0])
        top = sorted(grid, key=lambda mk: -crit(mk[0], mk[1], fams)[0])[:6]
        return {"mlp_crit": mlp_crit, "mlp": cfg, "members": list(best[0]), "normalise": best[1],
                "crit": crit(best[0], best[1], fams),
                "runners_up": [[" + ".join(m), k, *crit(m, k, fams)] for m, k in top[1:]]}

    old: tuple[tuple[str, ...], str] = (("ngram", "mlp c20 h96 s0"), "iqr")
    rows: list[dict[str, Any]] = []
    for held in [*families, None]:
        fams = [f for f in families if f != held]
        pick = procedure(fams)
        row: dict[str, Any] = {"held_out": held or "none (all four)", **pick}
        if held:
            _, row["held_auc"], row["held_dr5"] = crit(tuple(pick["members"]), pick["normalise"], [held])
            _, row["old_auc"], row["old_dr5"] = crit(old[0], old[1], [held])
        rows.append(row)
        mlps = " ".join(f"{c}:{v:.3f}" for c, v in pick["mlp_crit"].items())
        line = (f"  held out {row['held_out']:15s} MLP {mlps} -> {pick['mlp']}; members "
                f"{' + '.join(pick['members'])} [{pick['normalise']}] criterion {pick['crit'][0]:.4f} "
                f"(AUC {pick['crit'][1]:.4f} DR@5% {pick['crit'][2]:.3f})")
        if held:
            line += (f"; held-out AUC {row['held_auc']:.4f} DR@5% {row['held_dr5']:.3f} "
                     f"(old default ngram+mlp: {row['old_auc']:.4f} {row['old_dr5']:.3f})")
        out.print(line, highlight=False)
        if not held:
            for m, k, c, a_, d in pick["runners_up"]:
                out.print(f"    runner-up {m} [{k}]: {c:.4f} (AUC {a_:.4f} DR@5% {d:.3f})", highlight=False)
    return {"procedure": rows}


def unm(quick: bool, only: set[str] | None = None) -> list[dict[str, Any]]:
    from vims.datasets.unm import read_unm

    rows: list[dict[str, Any]] = []
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


def _print_speed(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="`vims score` end to end on ADFA-LD Validation (start-up included; median of runs)")
    for c in ("detector", "calls", "wall s", "CPU s", "calls/s", "calls/CPU s", "x baseline time"):
        table.add_column(c, justify="left" if c == "detector" else "right")
    for r in rows:
        table.add_row(r["detector"], f"{r['calls']:,}", f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
                      f"{r['calls_per_s']:,.0f}", f"{r['calls_per_cpu_s']:,.0f}", f"{r['vs_baseline']:.2f}")
    Console(width=160).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="leave out the slow detectors and repeats")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--only", help="comma-separated detector names to run (baselines always run)")
    ap.add_argument("--json-out", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--select", action="store_true",
                    help="run the leave-one-family-out selection of the default detector instead")
    args = ap.parse_args()
    if args.select:
        selection = jsonable(select_default())
        if args.json_out:
            args.json_out.write_text(to_json(selection) + "\n")
        if args.json:
            print_json(selection)
        return
    only = set(args.only.split(",")) if args.only else None
    fitted: dict[str, Any] = {}
    results = jsonable({"adfa": adfa(args.quick, only, fitted), "unm": unm(args.quick, only),
                        "score_speed": score_speed(fitted)})
    if args.json_out:
        args.json_out.write_text(to_json(results) + "\n")
    if args.json:
        print_json(results)
        return
    _print("ADFA-LD, standard protocol (fit Training; Validation vs all Attack)", results["adfa"])
    _print_speed(results["score_speed"])
    if results["unm"]:
        _print("UNM: fit on half the normal traces, test the other half + intrusions", results["unm"], "program")


if __name__ == "__main__":
    main()
