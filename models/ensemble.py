"""An ensemble that puts its members on one scale with out-of-fold training scores.

Members score on different scales (a mismatch rate, nats per call, a cosine distance). At fit time
each member gets out-of-fold anomaly scores of the training traces (``cv`` folds); a member's score is
then normalised as ``(s - median) / IQR`` of its out-of-fold scores, and the ensemble's anomaly is the
weighted mean of the normalised scores. Its own out-of-fold scores (``oof_anomaly_``, the same
combination of the members' out-of-fold scores) calibrate its threshold for free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from vims.errors import InputError
from vims.models._seq import Flat
from vims.models.base import Detector
from vims.models.calibration import oof_scores


def default_members() -> list[tuple[str, Detector]]:
    """The default members: a Kneser-Ney 6-gram model and the next-call MLP."""
    from vims.models.mlp import MLPNextCall
    from vims.models.ngram import NGram

    return [("ngram", NGram()), ("mlp", MLPNextCall())]


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

    def __init__(self, members: list[tuple[str, Detector]] | None = None, weights: list[float] | None = None,
                 cv: int = 3, random_state: int = 0) -> None:
        self.members = members
        self.weights = weights
        self.cv = cv
        self.random_state = random_state

    def _validate_params_(self) -> None:
        members = self.members if self.members is not None else default_members()
        if not members:
            raise InputError("an ensemble needs at least one member")
        if self.weights is not None and len(self.weights) != len(members):
            raise InputError(f"{len(self.weights)} weights for {len(members)} members")

    def _fit(self, flat: Flat, on_step: Callable[[str], Any] | None = None) -> None:
        from sklearn.base import clone

        members = self.members if self.members is not None else default_members()
        self.members_: list[tuple[str, Detector]] = []
        oof = []
        for name, det in members:
            s = oof_scores(det, flat, cv=int(self.cv), random_state=int(self.random_state))
            oof.append(s)
            self.members_.append((name, clone(det).fit(flat)))
            if on_step is not None:
                on_step(name)
        oof_arr = np.stack(oof, axis=1)
        self.centers_ = np.median(oof_arr, axis=0)
        q75, q25 = np.quantile(oof_arr, [0.75, 0.25], axis=0)
        self.scales_ = np.where(q75 - q25 > 0, q75 - q25, 1.0)
        w = np.ones(len(members)) if self.weights is None else np.asarray(self.weights, dtype=float)
        self.weights_ = w / w.sum()
        self.oof_anomaly_ = self.combine(oof_arr)

    def combine(self, member_scores: np.ndarray) -> np.ndarray:
        """Ensemble anomaly from a (traces x members) array of member anomaly scores."""
        z = (np.asarray(member_scores) - self.centers_) / self.scales_
        return np.asarray(z @ self.weights_)

    def _score(self, flat: Flat) -> np.ndarray:
        return self.combine(np.stack([det.anomaly_score(flat) for _, det in self.members_], axis=1))

    def _update(self, flat: Flat) -> None:
        for _, det in self.members_:
            det.update(flat)
