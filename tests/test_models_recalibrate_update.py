"""``recalibrate_update`` (what ``vims update`` runs) really updates the detector, then recalibrates.

Bookkeeping alone (how many calibration scores, the same ``far_``) holds for an update that never
touches the model; here the updated model must score the added normal traces as more normal than
before, and, for the count models that promise it, exactly as a refit on the old and new traces does.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_models_detectors import NAMES, attack_traces, normal_traces, small
from vims.models.calibration import calibrate, recalibrate_update
from vims.models.ngram import NGram
from vims.models.stide import Stide


def new_behaviour(n: int = 9, seed: int = 3) -> list[list[int]]:
    """Normal traces of a behaviour the first fit never saw (a new loop of new calls)."""
    rng = np.random.default_rng(seed)
    return [[11, 45, *([200, 201, 202, 203] * int(rng.integers(4, 9))), 1] for _ in range(n)]


@pytest.mark.parametrize("cv", [0, 3])
@pytest.mark.parametrize("name", NAMES)
def test_the_updated_model_finds_the_added_traces_more_normal(name: str, cv: int) -> None:
    det = calibrate(small(name), normal_traces(30), far=0.1, cv=3)
    added, unseen = new_behaviour(), new_behaviour(4, seed=11)  # `unseen`: same behaviour, not added
    before_added, before_unseen = det.anomaly_score(added), det.anomaly_score(unseen)
    old = np.array(det.calibration_scores_)
    recalibrate_update(det, added, cv=cv)
    assert det.anomaly_score(added).mean() < before_added.mean()
    assert det.anomaly_score(unseen).mean() < before_unseen.mean()
    assert det.n_traces_seen_ == 39
    # the threshold is taken over the old calibration scores and the new traces' scores, at the same far
    np.testing.assert_allclose(det.calibration_scores_[:len(old)], old)
    if cv == 0:  # scored by the updated model itself
        np.testing.assert_allclose(det.calibration_scores_[len(old):], det.anomaly_score(added))
    assert det.threshold_ == pytest.approx(np.quantile(det.calibration_scores_, 0.9))


@pytest.mark.parametrize("cls", [Stide, NGram])
def test_an_update_of_a_count_model_equals_a_refit(cls) -> None:
    first, added = normal_traces(30), new_behaviour()
    test = [*normal_traces(5, seed=8), *new_behaviour(3, seed=12), *attack_traces(5)]
    updated = recalibrate_update(calibrate(cls(), first, far=0.1, cv=3), added, cv=3)
    refit = cls().fit(first + added)
    np.testing.assert_allclose(updated.anomaly_score(test), refit.anomaly_score(test))
