"""The figures of an evaluation report (matplotlib, Agg): ROC, score histograms, confusion matrix.

- ``roc.png``: ROC curve with a logarithmic false-alarm axis (the low rates an operator lives at are
  visible), one thin curve per attack family (its attacks against every normal trace), the 1/5/10%
  false-alarm rates as dotted lines and the operating point of the chosen threshold marked;
- ``histograms.png``: the score distribution of each split and each attack family, the threshold as a
  vertical line;
- ``confusion.png``: the confusion matrix at the threshold, with precision and recall in the title.

:func:`confusion` gives the numbers the last figure shows (they go to ``metrics.json`` too).

>>> import pyarrow as pa
>>> t = pa.table({"score": [0.1, 0.2, 0.9, 0.8, 0.3], "label": ["normal"] * 3 + ["attack"] * 2,
...               "anomalous": [False, False, True, True, False]})
>>> confusion(t)
{'true_positives': 1, 'false_positives': 1, 'true_negatives': 2, 'false_negatives': 1, 'precision': 0.5, 'recall': 0.5}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vims.training.metrics import FARS


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labels(scores: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores.column("score").to_numpy(zero_copy_only=False), dtype=float)
    return s, np.array([lab == "attack" for lab in scores.column("label").to_pylist()], dtype=bool)


def confusion(scores: pa.Table) -> dict[str, Any]:
    """Counts of the ``anomalous`` flags against the labels, with precision and recall (None when undefined)."""
    _, attack = _labels(scores)
    flagged = np.asarray(scores.column("anomalous").to_pylist(), dtype=bool)
    tp, fp = int((flagged & attack).sum()), int((flagged & ~attack).sum())
    tn, fn = int((~flagged & ~attack).sum()), int((~flagged & attack).sum())
    return {"true_positives": tp, "false_positives": fp, "true_negatives": tn, "false_negatives": fn,
            "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None}


def roc_png(scores: pa.Table, path: Path, title: str, threshold: float | None) -> None:
    """ROC curve on a log false-alarm axis, per-family curves, the chosen operating point marked."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    s, attack = _labels(scores)
    fig, ax = plt.subplots(figsize=(6, 4.8), dpi=110)
    n_normal = int((~attack).sum())
    floor = 1.0 / max(n_normal, 1) / 2  # a false-alarm rate of 0 drawn at half the smallest step
    if attack.any() and n_normal:
        fpr, tpr, _ = roc_curve(attack, s)
        ax.plot(np.maximum(fpr, floor), tpr, lw=2, color="black", label="all attacks")
        families = np.array([f or "" for f in scores.column("family").to_pylist()], dtype=object)
        for fam in sorted(set(families[attack]) - {""}):
            keep = ~attack | (families == fam)
            f_fpr, f_tpr, _ = roc_curve(attack[keep], s[keep])
            ax.plot(np.maximum(f_fpr, floor), f_tpr, lw=1, alpha=0.8, label=str(fam))
        for far in FARS:
            ax.axvline(far, color="grey", lw=0.6, ls=":")
        if threshold is not None:
            op_far, op_dr = float(np.mean(s[~attack] > threshold)), float(np.mean(s[attack] > threshold))
            ax.plot([max(op_far, floor)], [op_dr], "o", ms=8, mfc="none", mec="red", mew=2,
                    label=f"threshold {threshold:.4g}: {op_far:.1%} FA, {op_dr:.1%} DR")
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false-alarm rate (log)")
    ax.set_ylabel("detection rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def histograms_png(scores: pa.Table, path: Path, threshold: float | None) -> None:
    """Score histograms: one panel by split, one by attack family (normal traces as the reference)."""
    plt = _pyplot()
    s, attack = _labels(scores)
    splits = np.array([x or "(none)" for x in scores.column("split").to_pylist()], dtype=object)
    families = np.array([f or "" for f in scores.column("family").to_pylist()], dtype=object)
    bins = np.histogram_bin_edges(s[np.isfinite(s)], bins=40) if np.isfinite(s).any() else 10
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110, sharex=True)
    groups = [[(str(g), s[splits == g]) for g in sorted(set(splits))],
              [("normal", s[~attack])] + [(str(f), s[attack & (families == f)])
                                          for f in sorted(set(families[attack]) - {""})]]
    for ax, title, panel in zip(axes, ("by split", "by attack family"), groups, strict=True):
        for name, values in panel:
            ax.hist(values, bins=bins, histtype="step", lw=1.4, density=True, label=f"{name} ({len(values)})")
        if threshold is not None:
            ax.axvline(threshold, color="red", lw=1, label="threshold")
        ax.set_title(f"anomaly score {title}", fontsize=10)
        ax.set_xlabel("anomaly score (higher = more anomalous)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("density")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def confusion_png(counts: dict[str, Any], path: Path) -> None:
    """The confusion matrix at the threshold, precision and recall in the title."""
    plt = _pyplot()
    m = np.array([[counts["true_negatives"], counts["false_positives"]],
                  [counts["false_negatives"], counts["true_positives"]]])
    fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=110)
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v:,}", ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set_xticks([0, 1], ["flagged normal", "flagged anomalous"])
    ax.set_yticks([0, 1], ["normal", "attack"])

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    ax.set_title(f"at the threshold: precision {pct(counts['precision'])}, recall {pct(counts['recall'])}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
