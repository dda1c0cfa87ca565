"""Detection metrics: ROC AUC and detection rate at fixed false-alarm rates, overall and per group.

Scores are anomaly scores (higher = more anomalous); ``label`` is ``"normal"`` or ``"attack"``.
The detection rate at false-alarm rate ``f`` uses the threshold that ``f`` of the normal traces
exceed (the ``1 - f`` quantile of normal scores) and counts the attacks strictly above it.

>>> import numpy as np
>>> m = detection_metrics(np.array([0.1, 0.2, 0.3, 0.9, 0.25]), np.array([0, 0, 0, 1, 1], dtype=bool))
>>> m["auc"], m["n_normal"], m["n_attack"], m["dr"]["10%"]
(0.8333333333333334, 3, 2, 0.5)
"""

from __future__ import annotations

from typing import Any

import numpy as np

FARS = (0.01, 0.05, 0.1)


def dr_at_far(normal: np.ndarray, attack: np.ndarray, far: float) -> float:
    """Fraction of ``attack`` scores above the threshold that ``far`` of ``normal`` exceed."""
    if len(attack) == 0 or len(normal) == 0:
        return float("nan")
    return float(np.mean(attack > np.quantile(normal, 1 - far)))


def auc(normal: np.ndarray, attack: np.ndarray) -> float:
    """ROC AUC of attack against normal scores (ties count half); NaN without both classes."""
    if len(attack) == 0 or len(normal) == 0:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(normal)), np.ones(len(attack))]
    return float(roc_auc_score(y, np.r_[normal, attack]))


def detection_metrics(scores: np.ndarray, is_attack: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """AUC, detection rates at :data:`FARS`, and the rates at ``threshold`` if given."""
    normal, attack = scores[~is_attack], scores[is_attack]
    out: dict[str, Any] = {
        "n_normal": len(normal),
        "n_attack": len(attack),
        "auc": auc(normal, attack),
        "dr": {f"{round(f * 100)}%": dr_at_far(normal, attack, f) for f in FARS},
    }
    if threshold is not None:
        out["at_threshold"] = {
            "threshold": float(threshold),
            "false_alarm_rate": float(np.mean(normal > threshold)) if len(normal) else float("nan"),
            "detection_rate": float(np.mean(attack > threshold)) if len(attack) else float("nan"),
        }
    return out


def grouped_metrics(scores: np.ndarray, is_attack: np.ndarray, groups: list[str | None],
                    per_group_normals: bool) -> dict[str, Any]:
    """Metrics per group value among attacks.

    With ``per_group_normals`` (programs) each group is judged against its own normal traces; without
    (attack families) every group's attacks are judged against all normal traces.
    """
    g = np.array([x if x is not None else "" for x in groups], dtype=object)
    out: dict[str, Any] = {}
    for value in sorted(set(g[is_attack]) - {""}):
        att = is_attack & (g == value)
        nor = ~is_attack & (g == value) if per_group_normals else ~is_attack
        if per_group_normals and not nor.any():
            continue
        out[str(value)] = detection_metrics(np.r_[scores[nor], scores[att]],
                                            np.r_[np.zeros(nor.sum(), bool), np.ones(att.sum(), bool)])
    return out


def jsonable(obj: Any) -> Any:
    """Replace NaN with None, recursively (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
