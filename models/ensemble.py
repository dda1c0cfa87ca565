"""An ensemble that puts its members on one scale with out-of-fold training scores.

Members score on different scales (a mismatch rate, nats per call, a cosine distance). At fit time
each member gets out-of-fold anomaly scores of the training traces (``cv`` folds); a member's score is
then normalised on those out-of-fold scores, either as ``(s - median) / IQR`` (``normalise="iqr"``) or
as its rank among them (``normalise="rank"``: the fraction of out-of-fold scores at or below ``s``, and
above the largest one ``1 + (s - largest) / IQR`` so that the order of far-out traces is kept), and the
ensemble's anomaly is the weighted mean of the normalised scores. Ranks put members with heavy-tailed
scores (the nearest-neighbour distance) on an equal footing with the others. Its own out-of-fold
scores (``oof_anomaly_``, the same combination of the members' out-of-fold scores) calibrate its
threshold for free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vims.errors import InputError
from vims.models._seq import Flat, unique_traces
from vims.models.base import Detector
from vims.models.calibration import oof_scores

NORMALISE = ("rank", "iqr")


def default_members() -> list[tuple[str, Detector]]:
    """The default members: TF-IDF nearest neighbours and two next-call MLPs.

    The MLPs see 10 previous calls and differ only in their seed (their mean halves the seed noise).
    Chosen by cross-validation on ADFA-LD Training and the attack families, one family left out at a
    time (``benchmarks/bench_models.py --select``), never by the Validation scores.
    """
    from vims.models.knn import KNN
    from vims.models.mlp import MLPNextCall

    return [("knn", KNN()), ("mlp", MLPNextCall(context=10, random_state=0)),
            ("mlp_seed1", MLPNextCall(context=10, random_state=1))]


class Ensemble(Detector):
    """Weighted mean of members normalised on their out-of-fold training scores.

    Parameters
    ----------
    members : list of (name, detector), optional
        The members (unfitted). Default: :func:`default_members`.
    weights : list of float, optional
        One weight per member (default: equal).
    cv : int
        Folds of the out-of-fold scores.
    normalise : {"rank", "iqr"}
        How a member's score is put on the common scale (see the module docstring).
    random_state : int
        Seed of the folds.

    Examples
    --------
    >>> from vims.models.ngram import NGram
    >>> from vims.models.stide import Stide
    >>> normal = [[1, 2, 3, 4] * 4, [1, 2, 3] * 5, [2, 3, 4] * 5, [1, 2, 3, 4, 2, 3] * 3] * 3
    >>> ens = Ensemble([("stide", Stide(k=3)), ("ngram", NGram(order=3))], cv=3).fit(normal)
    >>> a, b = ens.anomaly_score([[1, 2, 3, 4] * 3, [4, 3, 2, 1] * 3])
    >>> bool(a < b), ens.oof_anomaly_.shape
    (True, (12,))
    """

    #: What a model saved before ``normalise`` existed used (its instance lacks the attribute).
    normalise: str = "iqr"

    def __init__(self, members: list[tuple[str, Detector]] | None = None, weights: list[float] | None = None,
                 cv: int = 3, normalise: str = "rank", random_state: int = 0) -> None:
        self.members = members
        self.weights = weights
        self.cv = cv
        self.normalise = normalise
        self.random_state = random_state

    def _validate_params_(self) -> None:
        members = self.members if self.members is not None else default_members()
        if not members:
            raise InputError("an ensemble needs at least one member")
        if self.weights is not None and len(self.weights) != len(members):
            raise InputError(f"{len(self.weights)} weights for {len(members)} members")
        if self.normalise not in NORMALISE:
            raise InputError(f"normalise must be one of {', '.join(NORMALISE)}, not {self.normalise!r}")

    def _fit(self, flat: Flat) -> None:
        from sklearn.base import clone

        members = self.members if self.members is not None else default_members()
        self.members_: list[tuple[str, Detector]] = []
        oof = []
        for name, det in members:
            s = oof_scores(det, flat, cv=int(self.cv), random_state=int(self.random_state))
            oof.append(s)
            self.members_.append((name, clone(det).fit(flat)))
        oof_arr = np.stack(oof, axis=1)
        self.centers_ = np.median(oof_arr, axis=0)
        q75, q25 = np.quantile(oof_arr, [0.75, 0.25], axis=0)
        self.scales_ = np.where(q75 - q25 > 0, q75 - q25, 1.0)
        self.normalise_ = str(self.normalise)
        self.oof_sorted_ = np.sort(oof_arr, axis=0)  # (traces x members): the rank tables
        w = np.ones(len(members)) if self.weights is None else np.asarray(self.weights, dtype=float)
        self.weights_ = w / w.sum()
        self.oof_anomaly_ = self.combine(oof_arr)

    def combine(self, member_scores: np.ndarray) -> np.ndarray:
        """Ensemble anomaly from a (traces x members) array of member anomaly scores."""
        s = np.asarray(member_scores, dtype=float)
        # a model saved before ranks existed has no normalise_: it used median / IQR
        if getattr(self, "normalise_", "iqr") == "iqr":
            z = (s - self.centers_) / self.scales_
        else:
            ref = self.oof_sorted_
            z = np.empty_like(s)
            for j in range(s.shape[1]):
                rank = np.searchsorted(ref[:, j], s[:, j], side="right") / len(ref)
                z[:, j] = rank + np.maximum(s[:, j] - ref[-1, j], 0.0) / self.scales_[j]
        return np.asarray(z @ self.weights_)

    def _score(self, flat: Flat) -> np.ndarray:
        distinct, inverse = unique_traces(flat)  # every distinct trace scored once
        return self.combine(self.member_scores(distinct))[inverse]

    def member_scores(self, flat: Flat) -> np.ndarray:
        """Each member's anomaly score of every trace: a (traces x members) array.

        MLP members that read the same input (:meth:`~vims.models.mlp.MLPNextCall.input_key`, as the
        default's two seeds do) share its distinct windows instead of finding them twice.
        """
        from vims.models.mlp import MLPNextCall

        shared: dict[tuple[int, int, bytes], Any] = {}
        cols = []
        for _, det in self.members_:
            if isinstance(det, MLPNextCall):
                key = det.input_key()
                if key not in shared:
                    shared[key] = det.distinct_windows(flat)
                cols.append(det.aggregate_calls(det.scores_of(shared[key]), flat.offsets))
            else:
                cols.append(det.anomaly_score(flat))
        return np.stack(cols, axis=1)

    def _update(self, flat: Flat) -> None:
        for _, det in self.members_:
            det.update(flat)
