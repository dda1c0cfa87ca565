"""The analyst's commands: ``vims train``, ``vims score``, ``vims evaluate``, ``vims update``.

Heavy libraries are imported inside the commands so that ``vims --help`` starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    import pyarrow as pa

# metavar="": typer shows a flag's type (<bool>) otherwise, as if it took a value
JSON = typer.Option(False, "--json", metavar="", help="Print the result as JSON on stdout.")
MODEL = typer.Option(..., "--model", "-m", help="A model file written by `vims train` (its .card.json beside it).")
DATA = typer.Option(..., "--data", "-d", help="A trace table (Parquet from `vims datasets import`, or an "
                    "ADFA-LD .zip/folder read directly).")


def _train(
    data: Path = DATA,
    output: Path = typer.Option(..., "--output", "-o", help="Model file to write (.skops); the card goes beside it."),
    split: str = typer.Option("train", help="Fit on the normal traces of this split ('all': every normal trace)."),
    detector: str = typer.Option(None, help="stide, ngram, knn, mlp or ensemble (default: the registry's default)."),
    param: list[str] = typer.Option(None, "--param", "-p", help="A detector parameter, key=value (repeatable)."),
    far: float = typer.Option(0.05, help="Target false-alarm rate of the calibrated threshold."),
    cv: int = typer.Option(None, help="Folds of the out-of-fold calibration scores (default 5; the ensemble's "
                           "own default is 3, and --cv sets it)."),
    per_program: bool = typer.Option(False, "--per-program", metavar="",
                                     help="Fit a model set: one detector per program "
                                     "with enough traces, and a fallback for the rest (what the A-VM streams)."),
    min_traces: int = typer.Option(5, help="With --per-program: the traces a program needs for its own model."),
    as_json: bool = JSON,
) -> None:
    """Fit a detector on normal traces, calibrate its threshold out of fold, and save it with its card."""
    from vims.console import out, print_json, progress
    from vims.models.persist import save_model
    from vims.models.registry import DEFAULT_DETECTOR
    from vims.training.core import load_traces, train

    table = load_traces(data)
    name = detector or DEFAULT_DETECTOR
    if cv is not None and name == "ensemble" and not per_program:
        given = [p.split("=", 1)[1].strip() for p in param or [] if p.split("=", 1)[0].strip() == "cv" and "=" in p]
        if any(g != str(cv) for g in given):
            from vims.errors import InputError

            raise InputError(f"--cv {cv} and --param cv={given[0]} disagree: give the ensemble's folds once")
        if not given:
            param = [*(param or []), f"cv={cv}"]
    cv = 5 if cv is None else cv
    if per_program:
        from vims.training.per_program import DEFAULT_DETECTOR as SET_DETECTOR
        from vims.training.per_program import train_per_program

        with progress() as bar:
            task = bar.add_task("fitting per-program models", total=None)
            model_set, set_card = train_per_program(
                table, detector, param, split=split, far=far, cv=cv, min_traces=min_traces, data_path=str(data),
                on_program=lambda p: bar.update(task, description=f"fitting {p}"))
        set_card = save_model(model_set, output, set_card)
        programs = sorted(p for p, entry in set_card["programs"].items() if entry.get("model") != "*" or p == "*")
        if as_json:
            print_json({"model": str(output), "kind": "model-set", "detector": detector or SET_DETECTOR,
                        "programs": set_card["programs"], "training": set_card["training"]})
        else:
            out.print(f"[bold]model set[/] of {len(programs)} program models ({', '.join(programs)}) fitted on "
                      f"{set_card['training']['n_traces']:,} traces -> {output}", highlight=False)
        return
    with progress() as bar:
        task = bar.add_task(f"fitting {name}", total=None if name == "ensemble" else cv)
        det, card = train(table, detector=name, params=param, split=split, far=far, cv=cv,
                          data_path=str(data), on_fold=lambda _: bar.advance(task))
    card = save_model(det, output, card)
    summary = {"model": str(output), "detector": card["detector"], "params": card["params"],
               "threshold": card["threshold"], "far": far, "training": card["training"]}
    if as_json:
        print_json(summary)
    else:
        t = card["training"]
        out.print(f"[bold]{card['detector']}[/] fitted on {t['n_traces']:,} traces ({t['n_calls']:,} calls) "
                  f"in {t['fit_seconds']:.1f} s; threshold {card['threshold']:.4g} at {far:.0%} false alarms "
                  f"-> {output}")


def _score(
    model: Path = MODEL,
    data: Path = DATA,
    output: Path = typer.Option(..., "--output", "-o", help="Score table to write (Parquet)."),
    far: float = typer.Option(None, help="Flag at this false-alarm rate instead, chosen on the model's "
                              "out-of-fold calibration scores (no retraining)."),
    threshold: float = typer.Option(None, help="Flag the scores above this threshold instead."),
    explain: bool = typer.Option(False, "--explain", metavar="", help="Show each flagged trace's rarest "
                                 "windows of calls by name (a per-call detector, or an ensemble holding one)."),
    windows: int = typer.Option(3, help="With --explain: windows shown per flagged trace."),
    syscall_map: Path = typer.Option(None, "--syscall-map", help="With --explain: name calls from this map "
                                     "(UNM's syscallMap.txt) instead of the data's ABI table (ADFA-LD: i386)."),
    as_json: bool = JSON,
) -> None:
    """Score every trace: trace_id, split, label, family, program, score (higher = more anomalous), anomalous."""
    from vims.console import out, print_json
    from vims.errors import InputError
    from vims.schemas import SCORE_SCHEMA
    from vims.tables import write_table
    from vims.training.core import chosen_threshold, load_traces, open_model, score_table

    if output.is_dir():
        raise InputError("is a folder; --output is the score table (Parquet) to write, e.g. scores.parquet",
                         where=output)
    det, card = open_model(model)
    chosen = chosen_threshold(det, far, threshold)
    table = load_traces(data)
    scores = score_table(det, table, where=str(data), threshold=chosen, card=card)
    write_table(scores, output, SCORE_SCHEMA)
    n_anom = int(sum(scores.column("anomalous").to_pylist()))
    summary = {"output": str(output), "n_traces": scores.num_rows, "n_anomalous": n_anom, "threshold": chosen}
    explained = _explain(det, table, scores, windows, syscall_map) if explain else None
    if explained is not None:
        summary["explained"] = explained
    if as_json:
        print_json(summary)
        return
    shown = "per program" if chosen is None else f"{chosen:.4g}"
    out.print(f"{scores.num_rows:,} traces scored, {n_anom:,} anomalous (threshold {shown}) -> {output}")
    for e in explained or []:
        family = f" {e['family']}" if e["family"] else ""
        out.print(f"[bold]{e['trace_id']}[/] ({e['label']}{family}) score {e['score']:.4g}", highlight=False,
                  soft_wrap=True)
        for w in e["windows"]:
            out.print(f"  {w['line']}", highlight=False, markup=False, soft_wrap=True)


def _explain(det: object, table: pa.Table, scores: pa.Table, windows: int, syscall_map: Path | None) -> list:
    """The rarest windows of every flagged trace (``vims score --explain``)."""
    from vims.errors import InputError
    from vims.training.explain import explain_table

    if windows < 1:
        raise InputError(f"--windows must be at least 1, not {windows}")
    names = None
    if syscall_map is not None:
        from vims.datasets.unm import syscall_map as read_map

        names = read_map(syscall_map)
    return explain_table(det, table, scores, n=windows, names=names)


def _splits(table: pa.Table, split: list[str], where: Path) -> pa.Table:
    """The rows of ``split``; an unknown split is an error listing the splits present."""
    from vims.errors import InputError
    from vims.training.core import select

    present = sorted({s for s in table.column("split").to_pylist() if s is not None})
    unknown = sorted(set(split) - set(present))
    if unknown:
        raise InputError(f"no split {', '.join(map(repr, unknown))} in the data (splits present: "
                         f"{', '.join(present) or 'none'})", where=where)
    return select(table, split)


#: Suffixes of the files VIMS reads and writes: an --output report folder named so is a mistake.
_FILE_SUFFIXES = {".parquet", ".json", ".md", ".png", ".csv", ".skops", ".txt"}


def _evaluate(
    model: list[Path] = typer.Option(None, "--model", "-m", help="A model file written by `vims train` (not "
                                     "needed with --scores); repeat it to compare models in one table."),
    data: Path = typer.Option(None, "--data", "-d", help="A trace table to score (or give --scores)."),
    scores_path: Path = typer.Option(None, "--scores", help="A score table from `vims score` (e.g. after "
                                     "--far/--threshold): evaluated as it is, without scoring again."),
    output: Path = typer.Option(..., "--output", "-o", help="Report folder (metrics.json, report.md, roc.png, "
                                "histograms.png, confusion.png; with several models one folder each and "
                                "comparison.md)."),
    split: list[str] = typer.Option(None, "--split", help="Evaluate on these splits (repeatable; default: "
                                    "every split except the one the model was trained on)."),
    exclude_fitted: bool = typer.Option(False, "--exclude-fitted", help="Leave out the normal traces the "
                                        "model was fitted on (training or `vims update`; the card keeps their "
                                        "keys, a score table marks them) instead of refusing; the report says "
                                        "how many."),
    as_json: bool = JSON,
) -> None:
    """ROC AUC, detection at 1/5/10% false alarms, per family and program, figures and a report."""
    from vims.console import print_json
    from vims.errors import InputError

    models = list(model or [])
    if output.exists() and not output.is_dir():
        raise InputError("exists and is not a folder; --output is the report folder (metrics.json, roc.png, "
                         "report.md)", where=output)
    if not output.exists() and output.suffix.lower() in _FILE_SUFFIXES:
        raise InputError(f"names a {output.suffix} file; --output is the report folder (metrics.json, roc.png, "
                         "report.md); a score table is written by `vims score -o`", where=output)
    if (scores_path is None) == (data is None) or (data is not None and not models):
        raise InputError("give --model and --data (score the traces), or --scores (a score table)")
    if scores_path is not None and len(models) > 1:
        raise InputError("--scores is one model's scores: give at most one --model with it")
    if len(models) > 1:
        from vims.training.report import write_comparison

        if len({m.stem for m in models}) < len(models):
            raise InputError("two --model files share a name; each model's report goes to a folder named "
                             "after its file")
        results = {m.stem: _evaluate_one(m, data, None, output / m.stem, split, exclude_fitted) for m in models}
        comparison = write_comparison(results, output)
        if as_json:
            print_json({"comparison": comparison, "models": results})
        else:
            _print_comparison(comparison, output)
        return
    metrics = _evaluate_one(models[0] if models else None, data, scores_path, output, split, exclude_fitted)
    if as_json:
        print_json(metrics)
    else:
        _print_metrics(metrics, output)


def _evaluate_one(model: Path | None, data: Path | None, scores_path: Path | None, output: Path,
                  split: list[str] | None, exclude_fitted: bool = False) -> dict:
    """One model's evaluation (or one score table's) into the report folder ``output``; its metrics."""
    import numpy as np
    import pyarrow as pa

    from vims.errors import InputError
    from vims.models.modelset import ModelSet
    from vims.training.core import (
        check_evaluable,
        fitted_mask,
        load_traces,
        open_model,
        score_table,
        threshold_of,
    )
    from vims.training.report import write_report

    if scores_path is not None:
        from vims.schemas import SCORE_SCHEMA
        from vims.tables import read_table

        card = open_model(model)[1] if model is not None else {}
        scored = read_table(scores_path, SCORE_SCHEMA)
        scored = _splits(scored, split, scores_path) if split else scored
        marks = scored.column("fitted").to_pylist()
        known = any(m is not None for m in marks)
        fitted = np.array([m is True for m in marks], dtype=bool)
        if exclude_fitted and fitted.any():
            scored = scored.filter(pa.array(~fitted))
        check_evaluable(scored, card, where=str(scores_path),
                        fitted=np.zeros(scored.num_rows, bool) if exclude_fitted else fitted)
        return write_report(scored, card, output, str(scores_path), None,
                            excluded_fitted=int(fitted.sum()) if exclude_fitted else None, fitted_known=known)
    assert model is not None and data is not None
    det, card = open_model(model)
    table = load_traces(data)
    if split:
        table = _splits(table, split, data)
    else:
        trained = (card.get("training") or {}).get("split")
        if trained not in (None, "all"):
            table = table.filter(pa.array([s != trained for s in table.column("split").to_pylist()]))
    excluded = 0
    if exclude_fitted and table.num_rows:
        fitted = fitted_mask(table, card, where=str(data))
        excluded = int(fitted.sum())
        table = table.filter(pa.array(~fitted))
    if table.num_rows == 0:
        raise InputError("no traces left to evaluate on (check --split)", where=data)
    check_evaluable(table, card, where=str(data))
    threshold = None if isinstance(det, ModelSet) else threshold_of(det)
    return write_report(score_table(det, table, where=str(data), card=card), card, output, str(data), threshold,
                        excluded_fitted=excluded if exclude_fitted else None)


def _print_metrics(metrics: dict, output: Path) -> None:
    from vims.console import err, out

    o = metrics["overall"]
    auc = "n/a" if o["auc"] is None else f"{o['auc']:.4f}"
    if metrics.get("fitted_known") is False:
        err.print("warning: the score table does not say which traces the model was fitted on (scored without "
                  "its card, or by an older VIMS): an overlap with its training cannot be ruled out", highlight=False)
    check = metrics.get("target_check")
    if check and check["missed"]:
        err.print(f"warning: {check['actual']:.1%} false alarms at the calibrated threshold, target "
                  f"{check['target']:.0%}: {check['why']}", highlight=False)
    out.print(f"ROC AUC [bold]{auc}[/]; detection at 1/5/10% false alarms: "
              + ", ".join("n/a" if o["dr"][k] is None else f"{o['dr'][k]:.1%}" for k in ("1%", "5%", "10%"))
              + f"  ({o['n_normal']:,} normal, {o['n_attack']:,} attack) -> {output}/report.md")


def _print_comparison(comparison: list[dict], output: Path) -> None:
    from rich.table import Table

    from vims.console import out

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    table = Table(title=f"models compared -> {output}/comparison.md", title_justify="left", show_edge=False)
    for col in ("model", "detector", "AUC", "DR@1%", "DR@5%", "DR@10%", "FA at thr.", "DR at thr."):
        table.add_column(col, justify="left" if col in ("model", "detector") else "right")
    for r in comparison:
        table.add_row(r["model"], str(r["detector"]), "n/a" if r["auc"] is None else f"{r['auc']:.4f}",
                      *(pct(r["dr"][k]) for k in ("1%", "5%", "10%")), pct(r["false_alarm_rate"]),
                      pct(r["detection_rate"]))
    out.print(table)


def _update(
    model: Path = MODEL,
    data: Path = typer.Option(..., "--data", "-d", help="Traces an analyst confirmed as normal (only rows "
                              "labelled normal are used)."),
    output: Path = typer.Option(..., "--output", "-o", help="Updated model file to write (the input is kept)."),
    split: str = typer.Option(None, help="Use only the normal traces of this split (default: all)."),
    cv: int = typer.Option(3, help="Folds for the out-of-fold scores of the new traces (0: score in sample)."),
    as_json: bool = JSON,
) -> None:
    """Add confirmed-normal traces to a fitted model without fitting the old traces again, recalibrate, and
    record it in the card. Each detector continues from what it learned: stide and ngram add the new windows
    to their counts, knn adds the traces (its IDF recomputed), an MLP trains a few epochs on the new calls
    mixed with a replay sample of its training calls. The new traces' out-of-fold scores take --cv updates
    of a copy, then the full update: --cv + 1 updates, shown as they finish (--cv 0: one, optimistic)."""
    from vims.console import out, print_json, progress
    from vims.models.calibration import update_steps
    from vims.models.persist import save_model
    from vims.training.core import load_traces, open_model, training_rows, update

    det, card = open_model(model)
    table = load_traces(data)
    steps = update_steps(training_rows(table, split, where=str(data)).num_rows, cv)
    with progress() as bar:
        task = bar.add_task(f"updating ({steps - 1} out-of-fold, then the full update)", total=steps)
        new_card = update(det, card, table, split=split, cv=cv, data_path=str(data),
                          on_fold=lambda _: bar.advance(task))
    new_card = save_model(det, output, new_card)
    entry = new_card["updates"][-1]
    if as_json:
        print_json({"model": str(output), "update": entry, "threshold": new_card["threshold"]})
    else:
        out.print(f"added {entry['n_traces']:,} traces ({entry['n_calls']:,} calls) in {entry['seconds']:.1f} s; "
                  f"threshold {entry['threshold_before']:.4g} -> {entry['threshold_after']:.4g} -> {output}")


def register(app: typer.Typer) -> None:
    app.command("train")(_train)
    app.command("score")(_score)
    app.command("evaluate")(_evaluate)
    app.command("update")(_update)
