"""``vims evaluate``: metrics of a model on labelled traces, a ROC curve and a short report.

The report folder gets ``metrics.json`` (everything), the figures of :mod:`vims.training.plots`
(``roc.png``: log false-alarm axis, per-family curves, the operating point marked; ``histograms.png``:
scores by split and family; ``confusion.png``: the confusion matrix at the threshold) and
``report.md`` (a page a person can read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vims.console import to_json
from vims.training.metrics import FARS, detection_metrics, grouped_metrics, jsonable
from vims.training.plots import confusion, confusion_png, histograms_png, roc_png


def evaluate_scores(scores: pa.Table) -> dict[str, Any]:
    """Metrics from a score table (``vims score`` output): overall, per family, per program."""
    s = scores.column("score").to_numpy()
    labels = scores.column("label").to_pylist()
    is_attack = np.array([lab == "attack" for lab in labels], dtype=bool)
    anomalous = scores.column("anomalous").to_numpy(zero_copy_only=False)
    overall = detection_metrics(s, is_attack)
    overall["at_threshold"] = {
        "false_alarm_rate": float(anomalous[~is_attack].mean()) if (~is_attack).any() else None,
        "detection_rate": float(anomalous[is_attack].mean()) if is_attack.any() else None,
    }
    return jsonable({
        "overall": overall,
        "per_family": grouped_metrics(s, is_attack, scores.column("family").to_pylist(), False),
        "per_program": grouped_metrics(s, is_attack, scores.column("program").to_pylist(), True),
    })


def operating_points(scores: pa.Table, threshold: float | None) -> list[dict[str, Any]]:
    """Threshold, false-alarm rate and detection (overall and per family) at 1/5/10% false alarms and at
    ``threshold`` (the one the scores were flagged with), so an analyst picks one without retraining."""
    s = scores.column("score").to_numpy()
    is_attack = np.array([lab == "attack" for lab in scores.column("label").to_pylist()], dtype=bool)
    fam = np.array([f or "" for f in scores.column("family").to_pylist()], dtype=object)
    normal = s[~is_attack]
    if not len(normal) or not is_attack.any():
        return []
    points = [(f"{round(f * 100)}% false alarms", float(np.quantile(normal, 1 - f))) for f in FARS]
    if threshold is not None:
        points.append(("chosen threshold", float(threshold)))
    rows = []
    for name, t in points:
        rows.append({"point": name, "threshold": t, "false_alarm_rate": float(np.mean(normal > t)),
                     "detection_rate": float(np.mean(s[is_attack] > t)),
                     "per_family": {str(f): float(np.mean(s[is_attack & (fam == f)] > t))
                                    for f in sorted(set(fam[is_attack]) - {""})}})
    return rows


def _point_lines(points: list[dict[str, Any]]) -> list[str]:
    if not points:
        return []
    families = list(points[0]["per_family"])
    lines = ["## Operating points", "", "| point | threshold | false alarms | detection | "
             + " | ".join(families) + (" |" if families else ""),
             "|---|---:|---:|---:|" + "---:|" * len(families)]
    for p in points:
        lines.append(f"| {p['point']} | {p['threshold']:.6g} | {_pct(p['false_alarm_rate'])} | "
                     f"{_pct(p['detection_rate'])} | " + " | ".join(_pct(p["per_family"][f]) for f in families)
                     + (" |" if families else ""))
    return [*lines, ""]


def target_check(metrics: dict[str, Any], far: float | None) -> dict[str, Any] | None:
    """How far the false-alarm rate at the calibrated threshold lands from its target, and whether it misses.

    A miss is a difference beyond two binomial standard errors of the normal traces evaluated (and at
    least one point). Out-of-fold calibration scores are still scores of the training distribution, so
    new normal traces usually score higher: the rate lands above the target.
    """
    o = metrics["overall"]
    actual, n = o["at_threshold"]["false_alarm_rate"], o["n_normal"]
    if far is None or actual is None or not n:
        return None
    tolerance = max(0.01, 2 * (far * (1 - far) / n) ** 0.5)
    missed = abs(actual - far) > tolerance
    why = ("the calibration scores come from the training traces (out of fold, but from the same "
           "distribution), so they are optimistic for new normal traces") if actual > far else \
        "these normal traces score lower than the training traces did"
    return {"target": far, "actual": actual, "difference": actual - far, "tolerance": tolerance,
            "missed": missed, "why": why if missed else None}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "per program" if x is None else f"{x:.6g}"


def _target_lines(check: dict[str, Any] | None) -> list[str]:
    if not check or not check["missed"]:
        return []
    return [f"**The operating point misses its target**: {_pct(check['actual'])} false alarms for a target "
            f"of {_pct(check['target'])} ({100 * check['difference']:+.1f} points, beyond the "
            f"{100 * check['tolerance']:.1f}-point sampling tolerance) because {check['why']}. Choose the "
            "threshold on held-out normal traces for a rate you can rely on.", ""]


def _confusion_lines(c: dict[str, Any]) -> list[str]:
    return [f"At the threshold: precision {_pct(c['precision'])}, recall {_pct(c['recall'])} "
            f"({c['true_positives']:,} attacks flagged, {c['false_negatives']:,} missed; "
            f"{c['false_positives']:,} false alarms, {c['true_negatives']:,} normal traces passed).", "",
            "![Confusion matrix at the threshold](confusion.png)", ""]


def _markdown(metrics: dict[str, Any], card: dict[str, Any], data: str) -> str:
    o = metrics["overall"]
    auc = "n/a" if o["auc"] is None else f"{o['auc']:.4f}"
    lines = [
        f"# Evaluation of a `{card.get('detector')}` model",
        "",
        f"- data: `{data}` ({o['n_normal']} normal, {o['n_attack']} attack traces)",
        f"- trained on: {card.get('training', {}).get('n_traces')} traces of split "
        f"`{card.get('training', {}).get('split')}`; updates: {len(card.get('updates', []))}",
        f"- threshold {_num(metrics['model']['threshold'])} for a target false-alarm rate of {_pct(card.get('far'))}",
        *([f"- left out: {metrics['excluded_fitted']:,} normal traces the model was fitted on (--exclude-fitted)"]
          if metrics.get("excluded_fitted") is not None else []),
        *(["- **unknown overlap with training**: the score table does not say which traces the model was fitted "
           "on (scored without its card, or by an older VIMS); if some are among these normals the figures "
           "are inflated"] if metrics.get("fitted_known") is False else []),
        "",
        f"**ROC AUC {auc}**; detection at 1/5/10% false alarms: "
        + ", ".join(_pct(o["dr"][k]) for k in ("1%", "5%", "10%")) + ".",
        f"At the calibrated threshold: {_pct(o['at_threshold']['false_alarm_rate'])} false alarms, "
        f"{_pct(o['at_threshold']['detection_rate'])} of attacks detected.",
        "",
        *_target_lines(metrics.get("target_check")),
        *_confusion_lines(metrics["confusion"]),
        "![ROC curve: log false-alarm axis, per family, the operating point circled](roc.png)",
        "",
        "![Score histograms by split and by attack family](histograms.png)",
        "",
        *_point_lines(metrics.get("operating_points", [])),
    ]
    for title, key in (("Per attack family", "per_family"), ("Per program", "per_program")):
        if metrics[key]:
            lines += [f"## {title}", "", "| group | attacks | AUC | DR@1% | DR@5% | DR@10% |",
                      "|---|---:|---:|---:|---:|---:|"]
            for name, m in metrics[key].items():
                a = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
                lines.append(f"| {name} | {m['n_attack']} | {a} | " +
                             " | ".join(_pct(m["dr"][k]) for k in ("1%", "5%", "10%")) + " |")
            lines.append("")
    return "\n".join(lines)


def write_report(scores: pa.Table, card: dict[str, Any], out_dir: str | Path, data: str,
                 threshold: float | None = None, excluded_fitted: int | None = None,
                 fitted_known: bool = True) -> dict[str, Any]:
    """Write ``metrics.json``, the figures and ``report.md`` to ``out_dir``; return the metrics.

    ``threshold`` is the one the scores were flagged with (default: the card's); ``excluded_fitted``
    the normal traces left out because the model was fitted on them (``--exclude-fitted``);
    ``fitted_known`` False for a score table that does not say which traces those are (its ``fitted``
    column is null), which the report then says.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_scores(scores)
    metrics["model"] = {k: card.get(k) for k in ("detector", "params", "threshold", "far", "sha256")}
    if threshold is not None:
        metrics["model"]["threshold"] = float(threshold)
    metrics["overall"]["at_threshold"]["threshold"] = metrics["model"]["threshold"]
    metrics["target_check"] = target_check(metrics, card.get("far"))
    metrics["operating_points"] = operating_points(scores, metrics["model"]["threshold"])
    metrics["confusion"] = confusion(scores)
    metrics["data"] = data
    if excluded_fitted is not None:
        metrics["excluded_fitted"] = excluded_fitted
    metrics["fitted_known"] = fitted_known
    (out / "metrics.json").write_text(to_json(metrics) + "\n")
    auc = metrics["overall"]["auc"]
    roc_png(scores, out / "roc.png", f"{card.get('detector')} on {Path(data).name}"
            + ("" if auc is None else f" (AUC {auc:.3f})"), metrics["model"]["threshold"])
    histograms_png(scores, out / "histograms.png", metrics["model"]["threshold"])
    confusion_png(metrics["confusion"], out / "confusion.png")
    (out / "report.md").write_text(_markdown(metrics, card, data) + "\n")
    return metrics


def write_comparison(results: dict[str, dict[str, Any]], out_dir: str | Path) -> list[dict[str, Any]]:
    """One row per model (name -> its metrics, as :func:`write_report` returned them), best AUC first:
    written to ``comparison.md`` and ``comparison.json`` in ``out_dir``; returns the rows."""
    rows = []
    for name, m in results.items():
        o = m["overall"]
        rows.append({"model": name, "detector": m["model"]["detector"], "auc": o["auc"], "dr": o["dr"],
                     "threshold": m["model"]["threshold"], "false_alarm_rate": o["at_threshold"]["false_alarm_rate"],
                     "detection_rate": o["at_threshold"]["detection_rate"], "n_normal": o["n_normal"],
                     "n_attack": o["n_attack"], "report": f"{name}/report.md"})
    rows.sort(key=lambda r: -1.0 if r["auc"] is None else -r["auc"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Models compared", "", "| model | detector | AUC | DR@1% | DR@5% | DR@10% | threshold | "
             "false alarms at it | detection at it | normal | attack |", "|---|---|" + "---:|" * 9]
    for r in rows:
        auc = "n/a" if r["auc"] is None else f"{r['auc']:.4f}"
        lines.append(f"| [{r['model']}]({r['report']}) | {r['detector']} | {auc} | "
                     + " | ".join(_pct(r["dr"][k]) for k in ("1%", "5%", "10%"))
                     + f" | {_num(r['threshold'])} | {_pct(r['false_alarm_rate'])} | {_pct(r['detection_rate'])} | "
                     f"{r['n_normal']} | {r['n_attack']} |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    (out / "comparison.json").write_text(to_json(rows) + "\n")
    return rows
